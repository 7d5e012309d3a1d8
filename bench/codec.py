"""Codec-only benchmark: each compressor's local encode + decode on the benchmark FNO's 9.5 MB flat gradient, one
thread, against memcpy (`dst.copy_(src)`), and the same compressors' whole exchange on a world of one (every pass
around the codec: padding, error feedback, both phases). Run by `bench/comm.py --codec-only` (and at the end of a full comm run);
see bench/README.md, "Codecs at memory speed". Writes codec.json / codec.csv and prints a table.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bench.table import print_table


def _median_time(fn: Callable[[], object], min_time: float = 0.5, min_reps: int = 5) -> float:
    fn()   # warm-up (allocations, lazy init)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _paired_times(fn: Callable[[], object], ref: Callable[[], object], min_time: float = 1.0,
                  min_reps: int = 9) -> tuple[float, float]:
    """Medians of fn and ref called alternately in one window, so their ratio survives the host's drift (memcpy's
    speed here changes by up to 2x between minutes; separate windows gave ratios off by as much)."""
    fn(), ref()
    a: list[float] = []
    b: list[float] = []
    start = time.perf_counter()
    while len(a) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        ref()
        a.append(t1 - t0)
        b.append(time.perf_counter() - t1)
    return statistics.median(a), statistics.median(b)


def _fno_views():
    """The benchmark FNO's parameters as the ParamViews of one flat float32 bucket (complex ones as 2 floats each)."""
    from trainer.compress.base import ParamView
    from trainer.models.fno import FNO
    model = FNO(1, 1, (12, 12), width=32, padding=0)
    views, offset = [], 0
    for name, p in model.named_parameters():
        numel = p.numel() * (2 if p.is_complex() else 1)
        views.append(ParamView(name, offset, numel, tuple(p.shape), p.is_complex()))
        offset += numel
    return views, offset


def codec_benchmark(threads: int = 1) -> list[dict]:
    """Time each codec's local encode+decode on the model's flat gradient; GB/s of fp32 input.

    Codecs with a compiled kernel get two rows: the path FIELDTRAIN_KERNELS selects (default auto: compiled)
    and "(reference)", the torch reference; compile_s is the first call's extra time (compilation and the
    self-check; inductor caches compiled code on disk, so a rerun pays less). PowerSGD rows run
    PowerSGDCompressor.exchange itself (world size 1, error feedback off, as for the other codecs). Each row's
    vs_memcpy is against memcpy timed alternately with it (`_paired_times`); the memcpy row is timed alone."""
    import torch

    import kernels
    from kernels import fused
    from trainer.compress.powersgd import PowerSGDCompressor, powersgd_floats, powersgd_matrix
    from trainer.compress.transport import LocalTransport
    from trainer.config import CommConfig, PowerSGDOptions
    torch.set_num_threads(threads)
    views, n = _fno_views()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen)
    dst = torch.empty_like(x)
    k = math.ceil(0.01 * n)
    block = 256

    def int_codec(bits: int) -> Callable[[], tuple[torch.Tensor, int]]:
        def run():
            codes, s = kernels.encode_blockwise(x, bits, block, generator=gen)
            return kernels.decode_blockwise(codes, s, n, bits, block), codes.numel() + 4 * s.numel()
        return run

    def sign():
        packed, l1 = kernels.encode_signs(x)                    # as SignCompressor: the scale is mean |x|
        return kernels.unpack_signs(packed, n, scale=(l1 / n).float()), packed.numel() + 4

    def topk():
        v, i = kernels.topk_select(x, k)
        return kernels.scatter_dense(n, i, v), 8 * k

    def randk():
        v, i = kernels.randk_select(x, k, gen)
        return kernels.scatter_dense(n, i, v), 8 * k

    def powersgd(rank: int, compute: str = "float32") -> Callable[[], tuple[torch.Tensor, int]]:
        cfg = CommConfig(compressor="powersgd", error_feedback=False, powersgd=PowerSGDOptions(rank, compute=compute))
        comp = PowerSGDCompressor(cfg, LocalTransport())
        work = x.clone()
        wire = 0
        for v in views:
            matrix = powersgd_matrix(v.shape, v.is_complex, cfg)
            wire += 4 * (v.numel if matrix is None else sum(powersgd_floats(*matrix)))

        def run():
            out = comp.exchange(work, views)     # P = orth(M Q), Q = M^H P, approx = P Q^H, per matrix
            comp.commit()                        # this step's Q warm-starts the next
            return out, wire
        return run

    selected = fused.mode()
    codecs: list[tuple[str, str, Callable[[], tuple[torch.Tensor, int]]]] = [
        ("fp16", selected, lambda: (x.to(torch.float16).to(torch.float32), 2 * n))]
    for name, fn in [("int8", int_codec(8)), ("int4", int_codec(4)), ("sign", sign)]:
        codecs += [(name, selected, fn), (f"{name} (reference)", "reference", fn)]
    codecs += [("topk(1%)", selected, topk), ("randk(1%)", selected, randk),
               ("powersgd(r=1)", selected, powersgd(1)), ("powersgd(r=4)", selected, powersgd(4)),
               ("powersgd(r=4, bf16 products)", selected, powersgd(4, "bfloat16"))]

    def whole_exchange(name: str) -> Callable[[], tuple[torch.Tensor, int]]:
        """The compressor's whole exchange on a world of one, error feedback on (as in training): every pass it
        makes around its codec (padding, residuals, both phases), no communication."""
        from trainer.compress import COMPRESSORS
        comp = COMPRESSORS[name](CommConfig(compressor=name), LocalTransport())
        comp.seed = 0

        def run():
            out = comp.exchange(x.clone(), views)
            comp.commit()
            return out, 0                   # nothing crosses a world of one: see the codec's row for its bytes
        return run
    codecs += [(f"{name} exchange", selected, whole_exchange(name)) for name in ("int8", "int4", "sign", "topk", "randk")]

    t_copy = _median_time(lambda: dst.copy_(x))
    copy_gbps = 4 * n / t_copy / 1e9
    records = [{"codec": "memcpy", "kernels": "", "input_bytes": 4 * n, "wire_bytes": 4 * n, "median_s": t_copy,
                "gb_per_s": copy_gbps, "vs_memcpy": 1.0, "memcpy_s": t_copy, "compile_s": 0.0, "threads": threads}]
    for name, mode, fn in codecs:
        with kernels.kernel_mode(mode):
            t0 = time.perf_counter()
            wire = fn()[1]
            first = time.perf_counter() - t0
            t, t_copy_here = _paired_times(fn, lambda: dst.copy_(x))
        label = mode if name.split()[0] in ("int8", "int4", "sign") else "torch"     # the codecs with compiled kernels
        label = "exchange, W=1" if name.endswith("exchange") else label
        records.append({"codec": name, "kernels": label, "input_bytes": 4 * n, "wire_bytes": wire, "median_s": t,
                        "gb_per_s": 4 * n / t / 1e9, "vs_memcpy": t_copy_here / t, "memcpy_s": t_copy_here,
                        "compile_s": max(first - t, 0.0), "threads": threads})
    return records


def run_codec(out: Path) -> None:
    print("codec-only: local encode+decode on the FNO's gradient, 1 thread ...", flush=True)
    records = codec_benchmark()
    (out / "codec.json").write_text(json.dumps(records, indent=2))
    cols = ["codec", "kernels", "input_bytes", "wire_bytes", "median_s", "gb_per_s", "vs_memcpy", "memcpy_s", "compile_s",
            "threads"]
    with (out / "codec.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(records)
    print_table(["codec", "kernels", "MB in", "MB wire", "ms", "GB/s", "vs memcpy", "memcpy ms", "compile s"],
                [[r["codec"], r["kernels"], f"{r['input_bytes'] / 1e6:.2f}",
                  f"{r['wire_bytes'] / 1e6:.3f}" if r["wire_bytes"] else "-",
                  f"{1e3 * r['median_s']:.2f}", f"{r['gb_per_s']:.2f}", f"{r['vs_memcpy']:.3f}",
                  f"{1e3 * r['memcpy_s']:.2f}", f"{r['compile_s']:.1f}" if r["compile_s"] >= 0.05 else ""] for r in records])

"""The compute floor: one optimizer step of a model on one thread, timed and profiled op by op.

    .venv/bin/python bench/step.py --out bench/results/step                  # the demo's and comm.py's FNO
    .venv/bin/python bench/step.py --out DIR --cases demo --set model.fno.fast_padding=false
    .venv/bin/python bench/step.py --out DIR --optimizer-foreach --no-deterministic

A step is what the Trainer does between two batches on one rank with no exchange: the registered model's loss
(relative L2 in physical units), backward and the configured optimizer (Adam, `foreach=False` as the Trainer builds
it unless --optimizer-foreach), on random inputs of the case's shape, under `torch.use_deterministic_algorithms`
as `run.deterministic` sets it (launch/run.py's set_deterministic). Timings: the median, p10 and p90 of --steps steps after 3 of warm-up; then one
profiled step's per-op self CPU time (torch.profiler), the ops that take most. Writes step.json and step_ops.csv and
prints both tables. Not a test: nothing asserts on time, and timings mean something only on an idle core.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# case -> (config, overrides, grid): the `make demo` FNO on its 33x33 Darcy data, and bench/comm.py's FNO at 64x64
CASES = {
    "demo": ("configs/demo.toml", [], 33),
    "comm": ("configs/darcy_fno.toml", ["model.fno.width=32", "model.fno.modes=[12,12]", "model.fno.padding=0",
                                        "data.batch_size=16"], 64),
}


def build(case: str, sets: list[str], foreach: bool):
    import torch
    from torch import nn

    from trainer.config import load_config
    from trainer.registry import get_model_spec

    path, overrides, grid = CASES[case]
    cfg = load_config(REPO / path, [*overrides, *sets])
    spec = get_model_spec(cfg.model.name)
    data = _data_spec(cfg, grid)
    torch.manual_seed(cfg.run.seed)
    model = spec.build(cfg.model.params, data)
    o = cfg.optim
    opt = torch.optim.Adam(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                           foreach=foreach)
    g = torch.Generator().manual_seed(0)
    b = cfg.data.batch_size
    batch = {"x": torch.randn(b, *data.input_shape, generator=g), "y": torch.randn(b, *data.target_shape, generator=g)}

    def step():
        loss, _ = spec.loss(model, batch, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, cfg, sum(p.numel() for p in model.parameters() if isinstance(p, nn.Parameter))


def _data_spec(cfg, grid: int):
    from data.loader import ChannelNormalizer
    from trainer.registry import DataSpec
    dims = len(cfg.model.params.modes)
    shape = (1, *(grid,) * dims)
    return DataSpec(input_shape=shape, target_shape=shape, target_norm=ChannelNormalizer([0.0], [1.0]))


def measure(case: str, sets: list[str], steps: int, foreach: bool, deterministic: bool, top: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from launch.run import set_deterministic

    torch.set_num_threads(1)
    set_deterministic(deterministic)
    step, cfg, n_params = build(case, sets, foreach)
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted(({"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                   "share": e.self_cpu_time_total / total} for e in events), key=lambda r: -r["self_ms"])
    q = statistics.quantiles(times, n=10)
    fno = cfg.model.params
    return {"case": case, "sets": sets, "grid": CASES[case][2], "batch": cfg.data.batch_size,
            "padding": getattr(fno, "padding", None), "fast_padding": getattr(fno, "fast_padding", None),
            "params": n_params, "optimizer_foreach": foreach, "deterministic": deterministic, "threads": 1,
            "steps": steps, "median_s": statistics.median(times), "p10_s": q[0], "p90_s": q[-1],
            "profiled_ops": sum(e.count for e in events), "profiled_cpu_ms": total / 1e3, "top_ops": ops[:top],
            "load_avg": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    from bench.table import print_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every case")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=12, help="ops listed per case")
    p.add_argument("--optimizer-foreach", action="store_true", help="Adam(foreach=True) instead of the Trainer's")
    p.add_argument("--no-deterministic", action="store_true", help="without torch.use_deterministic_algorithms")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"--cases: unknown case {case!r}; allowed: {', '.join(CASES)}")
        rows.append(measure(case, args.set, args.steps, args.optimizer_foreach, not args.no_deterministic, args.top))
        rows[-1]["glibc_hugepages"] = "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")
    (out / "step.json").write_text(json.dumps(rows, indent=2))
    with (out / "step_ops.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "op", "calls", "self_ms", "share"])
        w.writeheader()
        w.writerows({"case": r["case"], **op} for r in rows for op in r["top_ops"])
    print(f"1 rank, 1 thread, on a machine of {os.cpu_count()} cores (load average at the end "
          f"{os.getloadavg()[0]:.2f}); glibc malloc with 2 MiB pages: "
          f"{'yes' if rows and rows[0]['glibc_hugepages'] else 'no (FIELDTRAIN_HUGEPAGES=0 or not glibc)'}")
    print_table(["case", "grid", "padding", "step s (median)", "p10", "p90", "ops/step", "profiled ms"],
                [[r["case"], str(r["grid"]), f"{r['padding']}{' (fast)' if r['fast_padding'] else ''}",
                  f"{r['median_s']:.3f}", f"{r['p10_s']:.3f}", f"{r['p90_s']:.3f}", str(r["profiled_ops"]),
                  f"{r['profiled_cpu_ms']:.0f}"] for r in rows])
    for r in rows:
        print(f"\n{r['case']}: the {len(r['top_ops'])} ops with most self CPU time in one profiled step")
        print_table(["op", "calls", "self ms", "share"],
                    [[o["op"], str(o["calls"]), f"{o['self_ms']:.1f}", f"{100 * o['share']:.1f}%"] for o in r["top_ops"]])
    print(f"wrote {out / 'step.json'} and {out / 'step_ops.csv'}")
    return 0


if __name__ == "__main__":
    from launch.cli import reexec_with_hugepage_malloc
    reexec_with_hugepage_malloc()            # as every `fieldtrain` command runs (launch/cli.py)
    sys.exit(main())

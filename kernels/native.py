"""Hand-written C for the CPU codecs: one pass per block where inductor's generated code makes two or three.

Inductor flattens a (rows, block) pointwise loop, so it reads each block twice (absmax, then quantise), recomputes
the block's scale for every vector and builds the element index from a table. Here each block is read into L1
once for its absmax and quantised from there, the scale is computed once per block, and the index is a running
counter. The formulas are the torch references' (kernels/quant.py, kernels/rng.py, kernels/bitpack.py) written in
the same float32 operations and order: built with -ffp-contract=off (no fused multiply-add) and without
-ffast-math, so every result is bit-identical, which `kernels.fused.FusedKernel` checks before first use.
Where the CPU has AVX-512 the hot loops are intrinsics over 16 lanes (the same operations, elementwise, so the same
bits); the portable loops take the tails, and everything elsewhere (tests build them with -mno-avx512f too).
Beside the quantisers: the scaled-sign encode (bits and a float64 sum of |x| in a fixed lane order), its decode and
residual, top-k (radix selects on |x|'s bit patterns, compress-stored candidates), scatter-add, and PowerSGD's
decode (a sum of rank-one terms in a fixed order).

The source (kernels/native.c) is compiled once per machine by the system C compiler (`cc`, or $CC) into the cache folder
($FIELDTRAIN_CACHE, default ~/.cache/fieldtrain) under a name that hashes source, flags, compiler and CPU model
(-march=native), written to a temporary name and renamed, so ranks compiling at once never load half a file.
Without a compiler, `library()` returns None after one logged warning and callers use inductor or the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
         "-std=c11"]

SOURCE = Path(__file__).with_name("native.c").read_text()

_SIGNATURES = {
    "ft_quantize8": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_int32,
                     ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
    "ft_encode4": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_int32,
                   ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
    "ft_dequantize8": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p],
    "ft_decode4": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p],
    "ft_pack_signs": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p],
    "ft_encode_signs": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p],
    "ft_sign_residual": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p],
    "ft_unpack_signs": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p],
    "ft_sample_rank": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p],
    "ft_topk": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
    "ft_scatter_add": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64],
    "ft_lowrank": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p],
}
_RETURNS = {"ft_sample_rank": ctypes.c_uint32, "ft_topk": ctypes.c_int64, "ft_scatter_add": ctypes.c_int64}

_lib: list = []           # [CDLL or None] once tried


def _cpu_model() -> str:
    """The CPU's model name and feature flags: -march=native code must not be loaded by a CPU that lacks a feature
    (a shared home folder on a cluster of mixed nodes, or VMs of one model with features masked differently)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    first = {}
    for line in lines:
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags", "Features", "CPU part") and key not in first:
            first[key] = line
    return "\n".join(first.values()) or platform.processor()


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256("\0".join([SOURCE, *FLAGS, version, _cpu_model(), platform.machine()]).encode())
    cache = Path(os.environ.get("FIELDTRAIN_CACHE", Path.home() / ".cache" / "fieldtrain")) / "kernels"
    lib = cache / f"codecs-{digest.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / "codecs.c"
        src.write_text(SOURCE)
        out = Path(tmp) / lib.name
        r = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{compiler} failed on the codec kernels: {r.stderr.strip()[-2000:]}")
        os.replace(out, lib)
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled codec library, built on first use; None (logged once) where no C compiler works or
    FIELDTRAIN_NATIVE=0."""
    if not _lib:
        lib = None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if os.environ.get("FIELDTRAIN_NATIVE", "1") == "0":
            log.info("kernels: native C codecs off (FIELDTRAIN_NATIVE=0)")
        elif compiler is None:
            log.warning("kernels: no C compiler (cc, gcc or $CC); the CPU codecs use torch.compile or the torch reference")
        else:
            try:
                lib = ctypes.CDLL(str(_build(compiler)))
                for name, args in _SIGNATURES.items():
                    getattr(lib, name).argtypes = args
                    getattr(lib, name).restype = _RETURNS.get(name)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("kernels: native C codecs unavailable (%s); using torch.compile or the torch reference",
                            str(e).splitlines()[0][:300])
                lib = None
        _lib.append(lib)
    return _lib[0]


def usable(*tensors: torch.Tensor) -> bool:
    """True when the C codecs can run on these tensors: CPU, contiguous, and the library built."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and library() is not None


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


# The wrappers take contiguous CPU tensors (float32 x and scales, int8 q, uint8 codes) and fill the outputs;
# `key` is kernels.rng's (2,) int32 key, None for nearest rounding. n counts elements, the last block may be short.
# res_out (float32, n), where given, receives x - decode(codes, scales).
def quantize8(x, n: int, block: int, levels: float, key, q_out, s_out, res_out=None) -> None:
    k0, k1 = key.tolist() if key is not None else (0, 0)
    library().ft_quantize8(_p(x), n, block, levels, int(key is not None), k0, k1, _p(q_out), _p(s_out),
                           None if res_out is None else _p(res_out))


def encode4(x, n: int, block: int, levels: float, key, codes_out, s_out, res_out=None) -> None:
    k0, k1 = key.tolist() if key is not None else (0, 0)
    library().ft_encode4(_p(x), n, block, levels, int(key is not None), k0, k1, _p(codes_out), _p(s_out),
                         None if res_out is None else _p(res_out))


def dequantize8(q, scales, n: int, block: int, out) -> None:
    library().ft_dequantize8(_p(q), _p(scales), n, block, _p(out))


def decode4(codes, scales, n: int, block: int, out) -> None:
    library().ft_decode4(_p(codes), _p(scales), n, block, _p(out))


def pack_signs(x, m: int, out) -> None:
    library().ft_pack_signs(_p(x), m, _p(out))


def encode_signs(x, out, l1_out) -> None:
    """out (n // 8 bytes at least) and l1_out (float64, 1 element) from float32 x (n,)."""
    library().ft_encode_signs(_p(x), x.numel(), _p(out), _p(l1_out))


def sign_residual(x, packed, m: int, scale: float, out) -> None:
    library().ft_sign_residual(_p(x), _p(packed), m, scale, _p(out))


def unpack_signs(packed, m: int, scale: float, out) -> None:
    library().ft_unpack_signs(_p(packed), m, scale, _p(out))


def sample_rank(x, stride: int, m: int, r: int) -> int:
    """The (r+1)-th smallest |x| bit pattern of x[::stride][:m] (an exact order statistic: any selection gives it)."""
    work = torch.empty(m, dtype=torch.int32)                  # named: a temporary would be freed before the call
    return library().ft_sample_rank(_p(x), stride, m, r, _p(work))


def topk(x, thr: int, k: int, capacity: int):
    """(values, int32 indices ascending) of the k largest |x| (ties to lower indices) from the candidates whose |x|
    bit pattern is >= thr, or None when fewer than k or more than `capacity` of them."""
    cand, work = torch.empty(2, capacity, dtype=torch.int32)
    cval = torch.empty(capacity, dtype=torch.float32)
    idx = torch.empty(k, dtype=torch.int32)
    val = torch.empty(k, dtype=torch.float32)
    count = library().ft_topk(_p(x), x.numel(), thr, k, capacity, _p(cand), _p(cval), _p(work), _p(idx), _p(val))
    return (val, idx) if k <= count <= capacity else None


def scatter_add(out, idx, val) -> None:
    """out[idx[j]] += val[j] in order j (float32 out and val, int32 idx, contiguous); ValueError, out untouched, if
    an index is outside [0, out.numel())."""
    bad = library().ft_scatter_add(_p(out), out.numel(), _p(idx), _p(val), idx.numel())
    if bad >= 0:
        raise ValueError(f"index {idx[bad].item()} (entry {bad}) is out of range for a dense vector of {out.numel()}")


def lowrank(coef, A, is_complex: bool, out) -> None:
    """out (n, len) from coef (n, r) or (n, r, 2) and A (r, len) float32 (complex: interleaved pairs): ft_lowrank."""
    n, r = coef.shape[0], coef.shape[1]
    library().ft_lowrank(_p(coef), _p(A), int(is_complex), n, r, A.shape[1], _p(out))

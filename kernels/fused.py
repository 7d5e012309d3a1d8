"""Compiled kernels beside the torch reference: the same formula, written for torch.compile to fuse.

A `FusedKernel` pairs a reference function (plain torch ops, the source of truth) with a fast function of the
same signature that runs bodies written as block loops (2-D views into one output buffer, no padding copies)
which inductor turns into one or two passes: generated C++ on CPU (gcc), Triton on CUDA. Both must give the
same bytes, so the formulas are written as the compiled code computes them (e.g. L * (1 / absmax), never a
division by a Python int, which inductor would turn into a multiplication by its reciprocal).

Selection, by FIELDTRAIN_KERNELS (or `set_mode`):
    reference   always the torch reference
    compiled    the compiled body for every size; an error if it cannot be compiled
    auto        (default) the compiled body for tensors of at least AUTO_MIN_NUMEL elements (per kernel) when
                torch.compile works on the device; otherwise the reference, after one logged warning
Before its first use on a device, a compiled kernel is run beside the reference on a small example; a
difference raises `KernelMismatchError` naming the kernel (never silent corruption). Shapes are dynamic, so
one compilation serves every size.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator

import torch

log = logging.getLogger(__name__)

MODES = ("reference", "compiled", "auto")
AUTO_MIN_NUMEL = 1 << 16          # smaller inputs take the reference: not worth seconds of compilation
RECOMPILE_LIMIT = 64              # graphs per compiled body


def _mode_from_env() -> str:
    mode = os.environ.get("FIELDTRAIN_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"FIELDTRAIN_KERNELS={mode!r}; allowed: {', '.join(MODES)}")
    return mode


_mode = _mode_from_env()
_broken: dict[str, str] = {}       # device type -> why compilation failed there (auto falls back)


class KernelMismatchError(RuntimeError):
    """A compiled kernel's output differs from its torch reference."""


def mode() -> str:
    return _mode


def set_mode(new: str) -> None:
    """Select reference | compiled | auto for the whole process (FIELDTRAIN_KERNELS sets the initial value)."""
    global _mode
    if new not in MODES:
        raise ValueError(f"kernel mode {new!r}; allowed: {', '.join(MODES)}")
    _mode = new


@contextlib.contextmanager
def kernel_mode(new: str) -> Iterator[None]:
    """`set_mode` for the duration of a with-block."""
    old = _mode
    set_mode(new)
    try:
        yield
    finally:
        set_mode(old)


def _first_tensor(args: tuple) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _same(a, b) -> bool:
    """Bitwise equality of (nested tuples of) tensors: same dtype, shape and bytes (NaN == NaN, 0.0 != -0.0)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(_bytes(a), _bytes(b)))
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def compile_body(body: Callable) -> Callable:
    """torch.compile(body), dynamic sizes. Bodies take tensors only (a Python int would be compiled in as a
    symbol, and inductor rewrites division by it) and write into output arguments, so a caller can fill
    slices of one buffer without copies; a dimension marked static (`torch._dynamo.mark_static`) is compiled
    in as a constant. The recompile limit is raised while it runs: each static block size, rounding mode
    and size-0/1 specialisation is a graph of its own."""
    compiled = torch.compile(body, dynamic=True, fullgraph=True)
    config = torch._dynamo.config

    def run(*args):
        old = config.recompile_limit
        config.recompile_limit = max(old, RECOMPILE_LIMIT)       # set/restore: config.patch costs ~0.1 ms a call
        try:
            return compiled(*args)
        finally:
            config.recompile_limit = old
    return run


class FusedKernel:
    """`name`: a `reference` function (torch ops, the source of truth) and a `fast` one of the same signature
    that runs compiled bodies (see `compile_body`) and must give the same bytes; `example(device)` gives
    arguments for the first-use self-check. Calling it dispatches by the mode (module docstring)."""

    def __init__(self, name: str, fast: Callable, reference: Callable, example: Callable[[torch.device], tuple],
                 min_numel: int = AUTO_MIN_NUMEL):
        self.name, self.fast, self.reference, self.example = name, fast, reference, example
        self.min_numel = min_numel          # auto: the compiled path from this many elements of the first argument
        self._checked: set[str] = set()

    def __call__(self, *args):
        x = _first_tensor(args)
        if _mode == "reference" or (_mode == "auto" and (x.numel() < self.min_numel or x.device.type in _broken)):
            return self.reference(*args)
        try:
            return self.compiled(*args)
        except KernelMismatchError:
            raise
        except Exception as e:                                           # no compiler, or inductor failed
            if _mode == "compiled":
                raise RuntimeError(f"compiled kernel {self.name} failed on {x.device}: {e}") from e
            _broken[x.device.type] = f"{type(e).__name__}: {e}"
            log.warning("kernels: torch.compile failed for %s on %s (%s: %s); using the torch reference kernels "
                        "there from now on", self.name, x.device.type, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
            return self.reference(*args)

    def compiled(self, *args):
        """The compiled path, whatever the mode (after the once-per-device self-check)."""
        device = _first_tensor(args).device
        if device.type not in self._checked:
            self.check(*self.example(device))
            self._checked.add(device.type)
        return self.fast(*args)

    def check(self, *args) -> None:
        """Raise KernelMismatchError unless the compiled path gives the reference's bytes on `args`."""
        got, want = self.fast(*args), self.reference(*args)
        if not _same(got, want):
            shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
            raise KernelMismatchError(f"compiled kernel {self.name} differs from its torch reference on "
                                      f"{_first_tensor(args).device} for arguments {shapes}; "
                                      f"set FIELDTRAIN_KERNELS=reference to run without it")

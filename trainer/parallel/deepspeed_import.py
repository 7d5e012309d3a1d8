"""DeepSpeed itself, for the adapter in deepspeed.py: the pinned version, its import (on this process's accelerator,
with fieldtrain's extensions cache), the private attributes the adapter relies on (checked before anything is
patched), and no JIT builds: `deepspeed_shm_comm` is skipped and any other op build is refused with a message, since
a build takes minutes under a lock whose stale copy (left by a killed compile) hangs every later run."""

from __future__ import annotations

import logging
import os
import re
import sys
import types
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

log = logging.getLogger("fieldtrain")

SUPPORTED_DEEPSPEED = ">=0.19.8,<0.20"     # what pyproject.toml pins; the internals below were read from 0.19.8
_SUPPORTED_RANGE = ((0, 19, 8), (0, 20))

# Private DeepSpeed attributes this adapter relies on, by ZeRO stage (checked before anything is patched).
_ZERO12_METHODS = ("average_tensor", "allreduce_bucket", "gradient_reduction_w_predivide", "has_overflow",
                   "_add_full_reduction_to_compact_grad_partition")
_ZERO12_FIELDS = ("ipg_buckets", "bit16_groups", "bit16_groups_flat", "single_partition_of_fp32_groups",
                  "averaged_gradients", "check_grad_overflow", "overflow", "optimizer", "loss_scaler")
_ZERO3_METHODS = ("_overflow_check_and_loss_scale_update", "_loss_scale_update_and_overflow_cleanup",
                  "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_contiguous_grads", "get_param_id")
_ZERO3_FIELDS = ("fp16_groups", "fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat", "grad_position",
                 "grad_partitions_flat_buffer", "overflow", "optimizer", "loss_scaler")
_MISSING = object()


def _restore(saved) -> None:
    for owner, name, old in saved:
        if old is _MISSING:
            try:
                delattr(owner, name)
            except AttributeError:
                pass
        else:
            setattr(owner, name, old)


# ---- DeepSpeed itself: version, internals, no JIT builds ----------------------------------------------------------
def _ds_version() -> str:
    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def extensions_dir() -> Path:
    """Where torch would JIT-build C++ ops: fieldtrain's own cache, one per DeepSpeed version, unless the user chose."""
    default = Path.home() / ".cache" / "fieldtrain" / "torch_extensions" / f"deepspeed-{_ds_version()}"
    return Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default)))


def stale_locks(directory: Path) -> list[Path]:
    """Lock files torch's cpp_extension leaves in `<dir>/<op>/lock` when a build is killed (every later build of
    that op then waits forever)."""
    return sorted(directory.glob("*/lock")) if directory.is_dir() else []


def _import_deepspeed():
    """DeepSpeed, imported on the accelerator this process has, with the extensions cache set to ours."""
    if "deepspeed" not in sys.modules:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        extensions_dir()
    version = _ds_version()
    lo, hi = _SUPPORTED_RANGE
    if not lo <= _version_tuple(version) < hi:
        raise RuntimeError(f"parallel.engine = 'deepspeed' supports deepspeed{SUPPORTED_DEEPSPEED}; installed: "
                           f"{version} (its ZeRO internals may differ): pip install 'deepspeed{SUPPORTED_DEEPSPEED}'")
    import deepspeed
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # ZeRO-3 gathers parameters with the collective torch 2.13 renamed; one warning per call otherwise
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    return deepspeed


def _ds_comm_torch() -> types.ModuleType:
    """deepspeed/comm/torch.py (`deepspeed.comm.torch` as an attribute is the torch package deepspeed.comm imports)."""
    import importlib
    return importlib.import_module("deepspeed.comm.torch")


def _adapter_check_module(ds, stage: int) -> None:
    """DeepSpeed's module-level pieces this adapter replaces exist (before any is touched)."""
    ds_comm_torch = _ds_comm_torch()
    from deepspeed.ops.op_builder.builder import OpBuilder
    missing = [n for owner, n in ((ds_comm_torch, "build_shm_op"), (OpBuilder, "jit_load"))
               if not callable(getattr(owner, n, None))]
    if stage == 3:
        import deepspeed.runtime.zero.stage3 as stage3
        if not callable(getattr(stage3, "reduce_scatter_coalesced", None)):
            missing.append("deepspeed.runtime.zero.stage3.reduce_scatter_coalesced")
    if missing:
        raise RuntimeError(f"DeepSpeed {_ds_version()} lacks {', '.join(missing)}, which fieldtrain's adapter "
                           f"(trainer/parallel/deepspeed.py) replaces; it supports deepspeed{SUPPORTED_DEEPSPEED}")


def _adapter_check_optimizer(zero, stage: int) -> None:
    """The ZeRO optimizer DeepSpeed built is the class, with the members, this adapter was written against."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    cls, methods, fields = ((DeepSpeedZeroOptimizer_Stage3, _ZERO3_METHODS, _ZERO3_FIELDS) if stage == 3 else
                            (DeepSpeedZeroOptimizer, _ZERO12_METHODS, _ZERO12_FIELDS))
    if not isinstance(zero, cls):
        raise RuntimeError(f"DeepSpeed {_ds_version()} built {type(zero).__name__} for ZeRO-{stage}, not "
                           f"{cls.__name__}: fieldtrain's adapter supports deepspeed{SUPPORTED_DEEPSPEED}")
    missing = [m for m in methods if not callable(getattr(zero, m, None))] + \
              [f for f in fields if not hasattr(zero, f)]
    if missing:
        raise RuntimeError(f"DeepSpeed {_ds_version()}'s {cls.__name__} lacks {', '.join(missing)}, which fieldtrain's "
                           f"adapter (trainer/parallel/deepspeed.py) uses; it supports deepspeed{SUPPORTED_DEEPSPEED}")


@contextmanager
def _no_jit(ds):
    """While DeepSpeed initialises: skip `deepspeed_shm_comm` (it only serves inference_all_reduce) and refuse any
    other JIT build, naming stale locks that would make one hang."""
    ds_comm_torch = _ds_comm_torch()
    from deepspeed.ops.op_builder.builder import OpBuilder
    directory = extensions_dir()
    locks = stale_locks(directory)
    if locks:
        log.warning("stale torch-extension build locks (a killed compile left them; any DeepSpeed op build using this "
                    "cache would hang): %s. fieldtrain builds no ops; remove them with: rm %s",
                    ", ".join(map(str, locks)), " ".join(map(str, locks)))

    def refuse_jit(builder, verbose=True):
        raise RuntimeError(jit_refusal(getattr(builder, "name", type(builder).__name__), directory))

    saved = [(ds_comm_torch, "build_shm_op", ds_comm_torch.build_shm_op), (OpBuilder, "jit_load", OpBuilder.jit_load)]
    ds_comm_torch.build_shm_op = lambda: None
    OpBuilder.jit_load = refuse_jit
    try:
        yield
    finally:
        _restore(saved)


def jit_refusal(op: str, directory: Path) -> str:
    """The message for a DeepSpeed op build that fieldtrain refuses (a build takes minutes under a lock that a killed
    run leaves behind, after which every build of that op hangs)."""
    locks = stale_locks(directory)
    lock_note = (f" Stale build locks in that cache (left by a killed compile; a build would wait on them forever): "
                 f"{', '.join(map(str, locks))}; remove them with: rm {' '.join(map(str, locks))}." if locks else "")
    return (f"DeepSpeed tried to JIT-compile its {op!r} op (into TORCH_EXTENSIONS_DIR={directory}). fieldtrain's "
            f"DeepSpeed engine uses no compiled op (client torch optimizer, no shm allreduce), so a setting outside "
            f"what it configures asked for one; fieldtrain refuses the build rather than risk a hang.{lock_note}")

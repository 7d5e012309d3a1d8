"""DeepSpeed ZeRO-1/2/3 (`parallel.engine = "deepspeed"`, `parallel.zero_stage = 1 | 2 | 3`).

    ZeRO-1  optimizer state partitioned; gradients averaged bucket by bucket (our allreduce-form compressors)
    ZeRO-2  + gradients partitioned after the exchange
    ZeRO-3  + parameters partitioned; gradients reduce-scattered (our reduce-scatter-form compressors)

This file, deepspeed_import.py (the pinned version, the checks of DeepSpeed's internals, no JIT builds) and
deepspeed_state.py (its checkpoint) are the whole adapter to DeepSpeed's internals; nothing else in
fieldtrain imports DeepSpeed. It
- initialises DeepSpeed on the process group our launchers made, with a client torch optimizer and without building
  any C++ op: `deepspeed_shm_comm` (only serves inference_all_reduce) is skipped, and any other JIT compile is refused
  with a message instead of taking the torch-extensions lock whose stale copy hangs every later run (`_no_jit`);
- puts our compressors into ZeRO's gradient exchange, which DeepSpeed offers no hook for: ZeRO-1/2's per-bucket
  `DeepSpeedZeroOptimizer.average_tensor` and ZeRO-3's `stage3.reduce_scatter_coalesced` are replaced; the fp32 paths
  beside them (`allreduce_bucket`, `gradient_reduction_w_predivide`, the contiguous all-reduce of ZeRO-3) are made to
  raise, and every backward checks that each gradient element went through our exchange (`_check_exchanged`), so a
  DeepSpeed that moved these internals fails loudly instead of silently sending fp32;
- stores complex parameters as real (..., 2) tensors viewed as complex in forward (ZeRO cannot hold mixed dtypes);
- checkpoints model, optimizer and DeepSpeed's counters through our DCP checkpoints (`ZeroState`, deepspeed_state.py),
  next to the compressor state that DeepSpeed's own checkpoints would drop.

What was read from DeepSpeed is pinned to SUPPORTED_DEEPSPEED; `_adapter_check_module` / `_adapter_check_optimizer`
name every private attribute used and refuse a DeepSpeed that lacks one.
"""

from __future__ import annotations

import logging
import math
import types
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from trainer.comm import GradientExchange
from trainer.compress import COMPRESSORS
from trainer.compress.base import ParamView
from trainer.parallel.deepspeed_import import (_MISSING, SUPPORTED_DEEPSPEED, _adapter_check_module,
                                              _adapter_check_optimizer, _ds_version, _import_deepspeed, _no_jit,
                                              _restore)
from trainer.parallel.deepspeed_state import ZeroState, _check_optimizer, _dtensor, _zero3_pieces
from trainer.parallel.engine import Engine, ExampleLoss, MakeOptimizer, _nbytes

log = logging.getLogger("fieldtrain")

ALLREDUCE_FORM = tuple(n for n in COMPRESSORS if not n.startswith("torch_"))   # ZeRO-1/2's bucket exchange
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_param_dtype(ds, name: str) -> None:
    """ValueError unless DeepSpeed's accelerator here takes parameters in `name` (its CPU accelerator asks oneDNN:
    fp16 needs AVX512-FP16 or AMX-FP16, which many CPUs lack), said before DeepSpeed's own "Type fp16 is not
    supported on your device" with the key to change."""
    acc = ds.accelerator.get_accelerator()
    ok = {"float16": acc.is_fp16_supported, "bfloat16": acc.is_bf16_supported}.get(name, lambda: True)()
    if not ok:
        raise ValueError(f"config key 'parallel.param_dtype' = {name!r}: DeepSpeed's {acc.device_name()} accelerator "
                         f"on this machine does not support {name} parameters (on CPU DeepSpeed asks oneDNN, which "
                         "needs AVX512-FP16 or AMX for float16); use "
                         f"{' or '.join(repr(d) for d in ('bfloat16', 'float32') if d != name)}")


def scatter_compressors() -> tuple[str, ...]:
    """The reduce-scatter-form compressors ZeRO-3 can carry (trainer/compress/scatter.py)."""
    from trainer.compress.scatter import SCATTER_COMPRESSORS
    return tuple(SCATTER_COMPRESSORS)


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    compressors = ALLREDUCE_FORM          # ZeRO-1/2; ZeRO-3 carries scatter_compressors() (see `allowed`)
    sharded = True

    # ---- config checks (no DeepSpeed import here: Config calls this while it loads) -------------------------------
    @staticmethod
    def allowed(zero_stage: int) -> tuple[str, ...]:
        return scatter_compressors() if zero_stage == 3 else ALLREDUCE_FORM

    @classmethod
    def check(cls, cfg) -> None:
        stage, comm = cfg.parallel.zero_stage, cfg.comm
        allowed = cls.allowed(stage)
        where = f"parallel.engine = 'deepspeed' with parallel.zero_stage = {stage}"
        if comm.compressor not in allowed:
            why = (" (torch's DDP communication hooks need DDP: parallel.engine = 'ddp')"
                   if comm.compressor.startswith("torch_") else "")
            raise ValueError(f"config key 'comm.compressor' = {comm.compressor!r} cannot run under {where}{why}; "
                             f"allowed there: {', '.join(map(repr, allowed))}")
        if comm.compressor == "auto" and not any(c in allowed for c in comm.auto_candidates):   # auto picks what fits
            raise ValueError(f"config key 'comm.auto_candidates' = {comm.auto_candidates!r}: none can run under "
                             f"{where}; allowed there: {', '.join(repr(c) for c in allowed if c not in ('auto', 'skip'))}")
        if stage == 3:
            from trainer.compress.scatter import check_scatter_config
            check_scatter_config(comm)   # comm.ef_state against the compressor's error feedback
        if cfg.parallel.reduce_dtype != "float32":
            raise ValueError(f"config key 'parallel.reduce_dtype' = {cfg.parallel.reduce_dtype!r} cannot run under "
                             "parallel.engine = 'deepspeed': its gradient exchange is comm.compressor's (fp32 for "
                             "'none'); allowed: 'float32' (a half-precision wire is comm.compressor = 'fp16')")

    @classmethod
    def resume_refusal(cls, saved: dict, new: dict) -> str | None:
        """ZeRO's checkpoint layout (flat partitions per stage) is its own: another engine or stage cannot resume it,
        nor can DeepSpeed resume another engine's."""
        if (saved.get("engine"), saved.get("zero_stage")) != (new.get("engine"), new.get("zero_stage")):
            return ("a DeepSpeed checkpoint resumes only under the same parallel.engine and parallel.zero_stage "
                    "(ZeRO keeps the optimizer state in flat per-stage partitions); DDP and FSDP2 resume each other")
        return None

    # ---- construction ----------------------------------------------------------------------------------------
    def __init__(self, cfg, model: nn.Module, device: torch.device, make_optimizer: MakeOptimizer,
                 example_loss: ExampleLoss):
        super().__init__(cfg, model, device, make_optimizer, example_loss)
        self.stage = cfg.parallel.zero_stage
        self._patches: list[tuple[object, str, object]] = []
        ds = _import_deepspeed()
        _adapter_check_module(ds, self.stage)
        if not dist.is_initialized():   # one rank: DeepSpeed still wants a process group
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1, device_id=device if device.type == "cuda" else None)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

        model.to(device)
        self.names = _ParamNames(model)               # original names, shapes and dtypes, before the rewrite below
        store_complex_as_real(model)
        self.names.bind(model)
        module = model
        dtype = _DTYPES[cfg.parallel.param_dtype]
        check_param_dtype(ds, cfg.parallel.param_dtype)
        if dtype != torch.float32:
            module = _Autocast(model, dtype, device.type)
        optimizer = make_optimizer(module.parameters())
        _check_optimizer(optimizer)

        with _no_jit(ds):
            ds.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False)
            self.ds, _, _, _ = ds.initialize(model=module, optimizer=optimizer, config=self._ds_config(cfg, dtype),
                                             dist_init_required=False)
        _adapter_check_optimizer(self.ds.optimizer, self.stage)
        self.model = self.ds                           # its forward runs ZeRO-3's gathers; backward goes via self
        self.zero = self.ds.optimizer                  # DeepSpeed's ZeRO optimizer
        self.optimizer = self.zero.optimizer           # the client torch optimizer: the scheduler drives its groups
        if self.stage == 3:
            _share_fp32_master(self.zero)

        self._produced = self._exchanged = 0           # gradient elements this backward: made / sent through us
        self._hooks = [p.register_post_accumulate_grad_hook(self._count_produced)
                       for p in module.parameters() if p.requires_grad]
        if self.stage == 3:
            from trainer.compress.scatter import ScatterExchange
            numel = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
            bucket = self.ds.zero_reduce_bucket_size()
            self.exchange = ScatterExchange(cfg.comm, seed=cfg.run.seed, numel=numel, buffers=-(-numel // bucket))
            self._install_zero3()
        else:
            self.exchange = GradientExchange(cfg.comm, model, cfg.run.seed, cfg.parallel.bucket_cap_mb)
            self._install_zero12()
        self._mesh = None
        if self.stage == 3:
            from torch.distributed.device_mesh import init_device_mesh
            self._mesh = init_device_mesh(device.type, (self.world_size,))
        log.info("deepspeed %s ZeRO-%d (%s params) over %d ranks; gradient exchange: %s", ds.__version__, self.stage,
                 cfg.parallel.param_dtype, self.world_size, self.compressor_name)

    def _ds_config(self, cfg, dtype: torch.dtype) -> dict:
        bucket = max(1, int(cfg.parallel.bucket_cap_mb * 2**20 / 4))   # DeepSpeed counts elements, DDP megabytes
        zero = {"stage": self.stage, "contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True,
                "reduce_bucket_size": bucket, "round_robin_gradients": False}
        if self.stage == 3:
            # every parameter partitioned (none kept whole on every rank): memory() and checkpoints see one layout
            zero.update({"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0})
        else:
            zero["allgather_bucket_size"] = bucket
        config = {"train_micro_batch_size_per_gpu": cfg.data.batch_size, "gradient_accumulation_steps": 1,
                  "zero_optimization": zero, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": float(cfg.optim.grad_clip), "steps_per_print": 2**62,
                  "wall_clock_breakdown": False}
        if dtype == torch.bfloat16:
            config["bf16"] = {"enabled": True}
        elif dtype == torch.float16:
            config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
        return config

    # ---- the compressors inside ZeRO ---------------------------------------------------------------------------
    def _install_zero12(self) -> None:
        """ZeRO-1/2 average each full gradient bucket (the flat IPG buffer, its parameters listed in
        `ipg_buckets[dtype].params`) in `average_tensor`; ours runs the compressor on it and hands the mean to
        DeepSpeed's own bookkeeping, as DeepSpeed's non-reduce-scatter branch does with its allreduce."""
        zero, exchange, names = self.zero, self.exchange, self.names

        def average_tensor(_self, tensor: torch.Tensor, communication_data_type: torch.dtype) -> None:
            bucket = zero.ipg_buckets[communication_data_type]
            params = [zero.bit16_groups[g][i] for g, i, _ in bucket.params]
            flat = tensor if tensor.dtype == torch.float32 else tensor.float()
            pieces = flat.split([p.numel() for p in params])
            for group in names.dtype_groups(params):   # as DDP buckets them: complex and real apart
                if len(group) == len(params):
                    exchange.run(flat, names.views(params, flat.numel()))
                    break
                buf = torch.cat([pieces[k] for k in group])
                exchange.run(buf, names.views([params[k] for k in group], buf.numel()))
                for k, averaged in zip(group, buf.split([params[k].numel() for k in group])):
                    pieces[k].copy_(averaged)
            if flat is not tensor:
                tensor.copy_(flat)
            self._exchanged += sum(p.numel() for p in params)
            zero._add_full_reduction_to_compact_grad_partition(flat, communication_data_type)

        self._patch(zero, "average_tensor", types.MethodType(average_tensor, zero))
        for name in ("allreduce_bucket", "gradient_reduction_w_predivide"):
            self._patch(zero, name, _bypass(name))

    def _install_zero3(self) -> None:
        """ZeRO-3 reduce-scatters each bucket's full gradients with `stage3.reduce_scatter_coalesced(tensors, group)`
        (a module function, looked up at call time). Ours lays them out as DeepSpeed does (row k: every tensor's
        k-th ceil(n/W) chunk) but zero-padded instead of uninitialised, and lets the compressor return the mean."""
        import deepspeed.runtime.zero.stage3 as stage3
        global _ACTIVE_ZERO3
        if _ACTIVE_ZERO3 is not None:
            raise RuntimeError("a second DeepSpeed ZeRO-3 engine in one process: close() the first one")
        _ACTIVE_ZERO3 = self
        self._grad_owners: dict[int, torch.Tensor] = {}
        self._patch(stage3, "reduce_scatter_coalesced", _zero3_reduce_scatter)
        name = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_contiguous_grads"
        self._patch(self.zero, name, _bypass(name))

    def grad_owner(self, grad: torch.Tensor) -> torch.Tensor:
        """The parameter whose .grad is `grad` (ZeRO-3's reduce-scatter receives gradients, not parameters)."""
        owner = self._grad_owners.get(id(grad))
        if owner is None or owner.grad is not grad:   # gradients are new tensors every step: look again
            self._grad_owners = {id(p.grad): p for p in self.names.by_param if p.grad is not None}
            owner = self._grad_owners.get(id(grad))
        if owner is None or owner.grad is not grad:
            raise RuntimeError(f"DeepSpeed {_ds_version()} reduce-scattered a tensor that is no parameter's .grad: "
                               f"the adapter supports deepspeed{SUPPORTED_DEEPSPEED}")
        return owner

    def _patch(self, owner, name: str, value) -> None:
        self._patches.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)

    def _count_produced(self, p: torch.Tensor) -> None:
        self._produced += getattr(p, "ds_numel", p.numel())

    def _check_exchanged(self) -> None:
        if self._exchanged != self._produced:
            raise RuntimeError(
                f"DeepSpeed {_ds_version()} reduced {self._produced - self._exchanged} of {self._produced} gradient "
                f"elements outside fieldtrain's exchange (ZeRO-{self.stage}, comm.compressor = "
                f"{self.cfg.comm.compressor!r}): the adapter in trainer/parallel/deepspeed.py no longer matches this "
                f"DeepSpeed's internals; it supports deepspeed{SUPPORTED_DEEPSPEED}")

    # ---- one step --------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self._produced = self._exchanged = 0
        self.ds.backward(loss)
        self._check_exchanged()

    def local_nonfinite(self) -> bool:
        return bool(self.exchange.local_nonfinite)

    def step(self, apply: bool) -> None:
        """DeepSpeed's step either way: a skipped step takes DeepSpeed's own overflow path (gradients dropped, no
        update, its skipped_steps and loss scale updated as for an fp16 overflow)."""
        if apply:
            self.ds.step()
            if self.zero.overflow:   # fp16: DeepSpeed's own check found an overflow our exchange did not see
                log.warning("DeepSpeed skipped an fp16 step for overflow (loss scale now %g)", self.zero.loss_scale)
                apply = False
        else:
            with self._forced_overflow():
                self.ds.step()
        self.exchange.end_step(applied=apply)
        self.zero_grad()

    @contextmanager
    def _forced_overflow(self):
        """DeepSpeed's overflow check answers "overflow" for one step (ZeRO-1/2: `has_overflow`, consulted when
        `check_grad_overflow`; ZeRO-3: `_overflow_check_and_loss_scale_update`, which checks fp16 only)."""
        zero = self.zero
        if self.stage == 3:
            def forced(update_scale=True):
                zero.overflow = True
                return zero._loss_scale_update_and_overflow_cleanup() if update_scale else True
            values = {"_overflow_check_and_loss_scale_update": forced}
        else:
            values = {"check_grad_overflow": True, "has_overflow": lambda partition_gradients=True: True}
        saved = [(zero, n, vars(zero).get(n, _MISSING)) for n in values]
        for name, value in values.items():
            setattr(zero, name, value)
        try:
            yield
            if not zero.overflow:
                raise RuntimeError(f"DeepSpeed {_ds_version()} applied a step fieldtrain skipped (its overflow path "
                                   f"moved): the adapter supports deepspeed{SUPPORTED_DEEPSPEED}")
        finally:
            _restore(saved)

    def zero_grad(self) -> None:
        self.zero.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float) -> None:   # DeepSpeed clips inside step (gradient_clipping)
        raise NotImplementedError("DeepSpeed clips gradients inside its step (config gradient_clipping)")

    # ---- state -----------------------------------------------------------------------------------------------
    def stateful(self) -> dict:
        state = {"model_optim": ZeroState(self)}
        if hasattr(self.exchange, "state_dict"):
            state["comm"] = self.exchange
        return state

    @torch.no_grad()
    def full_parameters(self) -> list[torch.Tensor]:
        """Every parameter in full, in the original model's `named_parameters` order and dtype (complex ones
        complex): ZeRO-3 gathers them (collective)."""
        params = [self.names.by_name[n] for n in self.names.order]
        if self.stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                full = [p.detach().clone() for p in params]
        else:
            full = [p.detach().clone() for p in params]
        return [self.names.original_form(n, t) for n, t in zip(self.names.order, full)]

    def master_weights(self) -> dict[str, torch.Tensor]:
        """ZeRO-1/2: the module's (full) parameters in their stored form (complex ones as real (..., 2) views).
        ZeRO-3: this rank's piece of each parameter's fp32 master partition."""
        if self.stage == 3:
            return {n: flat.narrow(0, offset, valid) for n, _, flat, offset, valid in _zero3_pieces(self)}
        return {n: self.names.by_name[n] for n in self.names.order}

    def load_master_weights(self, values: dict[str, torch.Tensor]) -> None:
        if self.stage == 3:
            # ZeRO-3 keeps parameters gathered after a forward while it expects to reuse them (stage3_max_reuse_
            # distance): release them, or the next forward would use the weights from before this load
            self.ds.empty_partition_cache()
        super().load_master_weights(values)
        if self.stage == 3:   # 16-bit parameter partitions are a copy of the fp32 master: forward reads them
            for n, p, flat, offset, valid in _zero3_pieces(self):
                if p.ds_tensor.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
                    p.ds_tensor.view(-1).narrow(0, 0, valid).copy_(values[n])

    def master_weights_for_checkpoint(self, values: dict[str, torch.Tensor]) -> dict:
        if self.stage != 3:
            return values
        return {n: _dtensor(self, values[n], p.ds_numel) for n, p, *_ in _zero3_pieces(self)}

    def load_master_weights_from_checkpoint(self, values: dict[str, torch.Tensor], loaded: dict) -> None:
        for n, t in values.items():
            v = loaded[n].to_local() if self.stage == 3 else loaded[n]
            if v.data_ptr() != t.data_ptr():
                t.copy_(v)

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds. ZeRO-1/2: the full (compute-dtype) parameters, gradients while they live (full in
        ZeRO-1 until averaged, then this rank's partition) and this rank's fp32 master + optimizer-state partition.
        ZeRO-3: parameter partitions (+ any parameter gathered right now), the gradient-partition buffer, and the
        fp32 master (when it is not the parameter partition itself) + optimizer-state partitions."""
        zero, seen = self.zero, set()

        def nbytes(tensors) -> int:
            total = 0
            for t in tensors:
                if t is None or not torch.is_tensor(t) or t.numel() == 0:
                    continue
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
                if key not in seen:
                    seen.add(key)
                    total += _nbytes(t)
            return total

        flat_states = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        module_params = list(self.ds.module.parameters())
        if self.stage == 3:
            params = nbytes(zero.fp16_partitioned_groups_flat) + nbytes(p.data for p in module_params)
            grads = nbytes([zero.grad_partitions_flat_buffer])
            optim = nbytes(zero.fp32_partitioned_groups_flat) + nbytes(flat_states)
        else:
            params = nbytes(zero.bit16_groups_flat)
            partitions = [getattr(v, "flat_partition", v) for v in zero.averaged_gradients.values()]
            live = [p.grad for p in module_params] + [g for v in partitions if v is not None
                                                       for g in (v if isinstance(v, (list, tuple)) else [v])]
            grads = nbytes(live)
            optim = nbytes(zero.single_partition_of_fp32_groups) + nbytes(flat_states)
        return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}

    def close(self) -> None:
        """Undo the patches (the DeepSpeed engine stays usable for full_parameters)."""
        global _ACTIVE_ZERO3
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        self._hooks = []
        _restore(reversed(self._patches))
        self._patches = []
        if _ACTIVE_ZERO3 is self:
            _ACTIVE_ZERO3 = None


def _share_fp32_master(zero) -> None:
    """ZeRO-3 means to use the parameter partition itself as the fp32 master when both are fp32 on one device
    (stage3._create_fp32_partitions), but compares a torch.device with a device-name string there, which is never
    equal, and keeps a copy: P/W bytes more per rank. Share them, as DeepSpeed intends (its step then copies the
    master onto itself)."""
    for lp, hp in zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat):
        if (lp is not None and lp.dtype == hp.dtype and lp.device == hp.device and lp.shape == hp.shape
                and lp.untyped_storage().data_ptr() != hp.untyped_storage().data_ptr()):
            hp.data = lp.data


# ---- ZeRO-3's reduce-scatter with our compressors -------------------------------------------------------------
_ACTIVE_ZERO3: DeepSpeedEngine | None = None


@torch.no_grad()
def _zero3_reduce_scatter(tensors: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """stage3.reduce_scatter_coalesced's contract: rank k gets the mean over ranks of every tensor's chunk k (chunks
    of ceil(n/W) elements, the last one short or empty)."""
    engine = _ACTIVE_ZERO3
    if engine is None or dist.get_world_size(group) != engine.world_size:
        raise RuntimeError("ZeRO-3 reduce-scatter outside fieldtrain's DeepSpeed engine (or on a sub-group it does not "
                           "handle): refusing to reduce gradients uncompressed")
    W, rank = engine.world_size, dist.get_rank(group)
    params = [engine.grad_owner(t) for t in tensors]
    result: list[torch.Tensor | None] = [None] * len(tensors)
    for members in engine.names.dtype_groups(params):   # complex and real apart, as FSDP2's units
        chunks = [math.ceil(tensors[k].numel() / W) for k in members]
        flat = torch.zeros(W, sum(chunks), dtype=torch.float32, device=tensors[0].device)   # row j: rank j's
        offset = 0
        for k, c in zip(members, chunks):
            src = tensors[k].reshape(-1)
            flat[:, offset:offset + c] = torch.nn.functional.pad(src, (0, W * c - src.numel())).view(W, c)
            offset += c
        key = "|".join(engine.names.name_of(params[k]) for k in members)
        mean = engine.exchange.reduce_scatter(flat.reshape(-1), key).to(tensors[0].dtype)
        offset = 0
        for k, c in zip(members, chunks):
            result[k] = mean.narrow(0, offset, max(0, min(c, tensors[k].numel() - rank * c)))
            offset += c
    engine._exchanged += sum(t.numel() for t in tensors)
    return result


def _bypass(name: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"DeepSpeed {_ds_version()} reduced gradients through {name}, which bypasses fieldtrain's "
                           "compressed exchange: the adapter in trainer/parallel/deepspeed.py no longer matches this "
                           f"DeepSpeed's internals; it supports deepspeed{SUPPORTED_DEEPSPEED}")
    return refuse


# ---- complex parameters: real (..., 2) storage --------------------------------------------------------------
class ViewAsComplex(nn.Module):
    """Parametrization: a complex parameter stored as a real (..., 2) tensor (ZeRO partitions one dtype per group),
    seen as complex by forward. Outputs are bit-identical to the complex parameter's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.float64):   # bf16/fp16 storage: no complex type to view it as
            x = x.float()
        if x.storage_offset() % 2 == 0 and x.stride(-1) == 1 and all(s % 2 == 0 for s in x.stride()[:-1]):
            return torch.view_as_complex(x)
        return torch.complex(x[..., 0], x[..., 1])   # storage not complex-aligned (a view into a ZeRO flat buffer)


def store_complex_as_real(model: nn.Module) -> list[str]:
    """Reparametrize every complex parameter as real (..., 2) storage; returns their names."""
    from torch.nn.utils import parametrize
    names = [n for n, p in model.named_parameters() if p.is_complex()]
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        p = getattr(owner, attr)
        setattr(owner, attr, nn.Parameter(torch.view_as_real(p.detach()).clone(), requires_grad=p.requires_grad))
        parametrize.register_parametrization(owner, attr, ViewAsComplex(), unsafe=True)   # forward changes dtype
    return names


class _ParamNames:
    """The model's parameters under their original names (before complex ones became `...parametrizations.<name>
    .original`), with their original shapes, so compressor state, checkpoints and full_parameters() speak of
    `fno.blocks.0.spectral.weight` whatever storage ZeRO holds it in."""

    def __init__(self, model: nn.Module):
        self.order = [n for n, _ in model.named_parameters()]
        self.complex = {n for n, p in model.named_parameters() if p.is_complex()}
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def bind(self, model: nn.Module) -> None:
        now = dict(model.named_parameters())
        self.by_name = {}
        for n in self.order:
            owner, _, attr = n.rpartition(".")
            stored = f"{owner + '.' if owner else ''}parametrizations.{attr}.original" if n in self.complex else n
            self.by_name[n] = now[stored]
        self.by_param = {p: n for n, p in self.by_name.items()}
        self._ids = {id(p): n for n, p in self.by_name.items()}
        self._views: dict[tuple, list[ParamView]] = {}

    def dtype_groups(self, params: list[torch.Tensor]) -> list[list[int]]:
        """Indices of `params` by the dtype the model gave them (complex, then real), each in bucket order: what
        DDP and FSDP2 exchange as separate buffers (a compressor's per-buffer statistics, a sign's scale or a top-k
        budget, should not mix complex spectral weights with real convolutions)."""
        complex_ = [k for k, p in enumerate(params) if self._ids[id(p)] in self.complex]
        real = [k for k, p in enumerate(params) if self._ids[id(p)] not in self.complex]
        return [g for g in (complex_, real) if g]

    def views(self, params: list[torch.Tensor], numel: int) -> list[ParamView]:
        """Where each parameter of a flat fp32 bucket sits, as trainer/comm.py describes DDP's buckets (a complex
        parameter: its complex shape, 2x its numel as interleaved real/imag floats — which is its real storage)."""
        key = tuple(id(p) for p in params)
        if key not in self._views:
            views, offset = [], 0
            for p in params:
                name = self._ids[id(p)]
                n = getattr(p, "ds_numel", p.numel())
                views.append(ParamView(name, offset, n, self.shapes[name], name in self.complex))
                offset += n
            assert offset == numel, f"ZeRO bucket layout: parameters cover {offset} floats, the buffer has {numel}"
            self._views[key] = views
        return self._views[key]

    def name_of(self, p: torch.Tensor) -> str:
        return self._ids[id(p)]

    def original_form(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A full parameter (stored form) as the model defined it: complex ones viewed as complex."""
        if name in self.complex:
            t = t.float().contiguous()
            return torch.view_as_complex(t)
        return t


class _Autocast(nn.Module):
    """parallel.param_dtype bf16/fp16: DeepSpeed stores the parameters in that dtype; forward runs under autocast
    (inputs come in fp32) and returns fp32 for the loss."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.module, self.dtype, self.device_type = module, dtype, device_type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out

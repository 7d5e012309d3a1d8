"""The DeepSpeed engine's checkpoint (`ZeroState`): model, optimizer partitions and DeepSpeed's counters in our DCP
checkpoints, beside the compressor state DeepSpeed's own checkpoints would drop. ZeRO-1/2 keep each rank's flat fp32
and optimizer-state partitions (same world size to resume); ZeRO-3 saves each parameter's partitions as DTensors, which
DCP re-partitions into any world size. Split from deepspeed.py (the adapter) to keep each file one read."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.stateful import Stateful

if TYPE_CHECKING:
    from trainer.parallel.deepspeed import DeepSpeedEngine


def _check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
        raise ValueError(f"parallel.engine = 'deepspeed' checkpoints Adam, AdamW and SGD; got "
                         f"{type(optimizer).__name__}")


def _state_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The per-element state tensors the optimizer keeps (created at its first step)."""
    if isinstance(optimizer, torch.optim.SGD):
        return ("momentum_buffer",) if optimizer.defaults.get("momentum", 0) else ()
    amsgrad = any(g.get("amsgrad") for g in optimizer.param_groups)
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())


# ---- checkpoints ----------------------------------------------------------------------------------------------
class ZeroState(Stateful):
    """The engine's checkpoint entry ("model_optim"), built without collectives (CheckpointManager sizes it on rank 0
    alone). Replicated: `layout`, `engine` (DeepSpeed's counters, loss scale) and the optimizer's step count.

    ZeRO-1/2: `model` holds every parameter in full (each rank has them: plain tensors, the original names and dtypes,
    as the DDP engine saves them); `zero12_rank<r>_of_<W>` holds rank r's fp32 master and optimizer-state partitions
    (one flat tensor per parameter group). Resuming needs the same world size (ValueError otherwise).
    ZeRO-3: `zero3_model` / `zero3_optim.<state>` hold, per parameter (original names), the fp32 master and optimizer
    state flattened, as DTensors sharded exactly as ZeRO-3 partitions them (chunk k of ceil(n/W) elements on rank
    k), so DCP writes each rank's partition and re-partitions on load into any world size."""

    def __init__(self, engine: DeepSpeedEngine):
        self.engine = engine

    def _rank_key(self) -> str:
        e = self.engine
        return f"zero12_rank{e.rank}_of_{e.world_size}"

    def per_rank_keys(self) -> list[str]:
        return [] if self.engine.stage == 3 else [self._rank_key()]

    def optional_keys(self) -> list[str]:
        # absent from a checkpoint of another engine, stage or world size: load_state_dict says which, clearly
        return list(self.state_dict_keys())

    def state_dict_keys(self) -> list[str]:
        if self.engine.stage == 3:
            return ["layout", "engine", "step", "zero3_model", "zero3_optim"]
        return ["layout", "engine", "step", "model", self._rank_key()]

    def state_dict(self) -> dict:
        e = self.engine
        state = {"layout": {"engine": "deepspeed", "zero_stage": e.stage, "world_size": e.world_size},
                 "engine": _engine_counters(e), "step": _step_count(e)}
        if e.stage == 3:
            state["zero3_model"], state["zero3_optim"] = _zero3_shards(e)
        else:
            state["model"] = {n: e.names.original_form(n, e.names.by_name[n].detach().float()) for n in e.names.order}
            state[self._rank_key()] = _zero12_partitions(e)
        return state

    def load_state_dict(self, state: dict) -> None:
        e = self.engine
        layout = state.get("layout")
        if layout is None:
            raise ValueError("this checkpoint was not written by parallel.engine = 'deepspeed': resume it under the "
                             "engine that wrote it (the DeepSpeed engine keeps ZeRO's partitions, not DDP's layout)")
        if int(layout["zero_stage"]) != e.stage:
            raise ValueError(f"checkpoint written with parallel.zero_stage = {layout['zero_stage']}, this run has "
                             f"{e.stage}: resume with parallel.zero_stage = {layout['zero_stage']}")
        if e.stage != 3 and int(layout["world_size"]) != e.world_size:
            raise ValueError(f"checkpoint written by {layout['world_size']} ranks under ZeRO-{e.stage}, this run has "
                             f"{e.world_size}: ZeRO-1/2 checkpoints hold each rank's optimizer partition and are not "
                             f"re-partitioned; resume with {layout['world_size']} ranks (ZeRO-3 checkpoints "
                             "re-partition into any world size)")
        with torch.no_grad():
            if e.stage == 3:
                _load_zero3(e, state["zero3_model"], state["zero3_optim"], state["step"])
            else:
                _load_zero12(e, state["model"], state[self._rank_key()], state["step"])
        _set_engine_counters(e, state["engine"])


def _engine_counters(e: DeepSpeedEngine) -> dict:
    scaler = e.zero.loss_scaler
    return {"global_steps": int(e.ds.global_steps), "global_samples": int(e.ds.global_samples),
            "skipped_steps": int(e.ds.skipped_steps),
            "loss_scale": {k: getattr(scaler, k) for k in ("cur_scale", "cur_iter", "last_overflow_iter",
                                                          "cur_hysteresis") if hasattr(scaler, k)}}


def _set_engine_counters(e: DeepSpeedEngine, counters: dict) -> None:
    e.ds.global_steps, e.ds.global_samples = int(counters["global_steps"]), int(counters["global_samples"])
    e.ds.skipped_steps = int(counters["skipped_steps"])
    for k, v in counters["loss_scale"].items():
        setattr(e.zero.loss_scaler, k, v)


def _flat_partitions(e: DeepSpeedEngine) -> list[torch.Tensor]:
    """The fp32 master partitions the client optimizer steps on, one flat tensor per (sub-)group."""
    return list(e.zero.fp32_partitioned_groups_flat if e.stage == 3 else e.zero.single_partition_of_fp32_groups)


def _step_count(e: DeepSpeedEngine) -> torch.Tensor:
    for flat in _flat_partitions(e):
        step = e.optimizer.state.get(flat, {}).get("step")
        if step is not None:
            return step.detach().clone()
    return torch.tensor(0.0)


def _optimizer_state(e: DeepSpeedEngine, flat: torch.Tensor, create_step: torch.Tensor | None = None) -> dict:
    """The client optimizer's state for one flat partition; created (as its first step would) when asked to."""
    state = e.optimizer.state.get(flat)
    if not state and create_step is not None:
        state = e.optimizer.state[flat]
        for key in _state_keys(e.optimizer):
            state[key] = torch.zeros_like(flat)
        if not isinstance(e.optimizer, torch.optim.SGD):
            state["step"] = create_step.clone()
    return state or {}


def _zero12_partitions(e: DeepSpeedEngine) -> dict:
    out = {"fp32": {}, "state": {}}
    for g, flat in enumerate(_flat_partitions(e)):
        out["fp32"][str(g)] = flat.detach()
        state = _optimizer_state(e, flat)
        out["state"][str(g)] = {k: (state[k].detach() if k in state else torch.zeros_like(flat))
                                for k in _state_keys(e.optimizer)}
    return out


def _load_zero12(e: DeepSpeedEngine, model: dict, mine: dict, step: torch.Tensor) -> None:
    for n in e.names.order:
        p = e.names.by_name[n]
        value = model[n]
        p.data.copy_((torch.view_as_real(value) if value.is_complex() else value).view_as(p))
    for g, flat in enumerate(_flat_partitions(e)):
        saved = mine["fp32"][str(g)]
        if saved.shape != flat.shape:
            raise ValueError(f"checkpoint's ZeRO partition {g} holds {saved.numel()} elements, this run's "
                             f"{flat.numel()}: the model or parallel settings differ from the run that wrote it")
        flat.data.copy_(saved)
        state = _optimizer_state(e, flat, create_step=step)
        for k, v in mine["state"][str(g)].items():
            state[k].copy_(v)
        if "step" in state:
            state["step"].copy_(step)


def _zero3_pieces(e: DeepSpeedEngine):
    """(name, fp32 master flat partition, offset in it, valid elements, full numel) per parameter this engine
    partitions: ZeRO-3 gives rank k elements [k*c, (k+1)*c) of the flattened parameter, c = ceil(n/W)."""
    zero = e.zero
    for n in e.names.order:
        p = e.names.by_name[n]
        g, offset, chunk = zero.grad_position[zero.get_param_id(p)]
        valid = max(0, min(chunk, p.ds_numel - e.rank * chunk))
        yield n, p, zero.fp32_partitioned_groups_flat[g], int(offset), valid


def _dtensor(e: DeepSpeedEngine, local: torch.Tensor, numel: int):
    from torch.distributed.tensor import DTensor, Shard
    return DTensor.from_local(local, e._mesh, [Shard(0)], run_check=False, shape=torch.Size([numel]), stride=(1,))


def _zero3_shards(e: DeepSpeedEngine) -> tuple[dict, dict]:
    model, optim = {}, {k: {} for k in _state_keys(e.optimizer)}
    for n, p, flat, offset, valid in _zero3_pieces(e):
        model[n] = _dtensor(e, flat.detach().narrow(0, offset, valid), p.ds_numel)
        state = _optimizer_state(e, flat)
        for k in optim:
            local = state[k].detach().narrow(0, offset, valid) if k in state else torch.zeros(valid)
            optim[k][n] = _dtensor(e, local, p.ds_numel)
    return model, optim


def _load_zero3(e: DeepSpeedEngine, model: dict, optim: dict, step: torch.Tensor) -> None:
    for n, p, flat, offset, valid in _zero3_pieces(e):
        flat.narrow(0, offset, valid).copy_(model[n].to_local())
        if p.ds_tensor.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():   # bf16/fp16: a copy
            p.ds_tensor.view(-1).narrow(0, 0, valid).copy_(model[n].to_local())
        state = _optimizer_state(e, flat, create_step=step)
        for k, values in optim.items():
            state[k].narrow(0, offset, valid).copy_(values[n].to_local())
        if "step" in state:
            state["step"].copy_(step)

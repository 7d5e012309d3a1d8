"""FSDP2: parameters, gradients and optimizer state sharded over ranks (`torch.distributed.fsdp.fully_shard`), with
the gradient reduce-scatter run by our compressors (trainer/compress/scatter.py).

    units = ModelSpec.shard_units(model), each split by parameter dtype     one FSDP group per (unit, dtype)
    fully_shard(unit) for each, then fully_shard(model)                     root last; DTensor parameters
    backward: FSDP copies a group's gradients into one flat buffer, row k = what rank k owns
              (`flat.view(W, S)[k]`), and ExchangeReduceScatter hands it to ScatterExchange -> this rank's mean
    step:     the optimizer on the local shards; clip_grad_norm_ reduces the norm over DTensor shards

Complex weights: FSDP wants one original dtype per group ("FSDP expects uniform original parameter dtype"). A
unit holding several dtypes (an FNO block: complex64 spectral weight, float32 skip conv) is split into its largest
submodules of one dtype (`block.spectral`, `block.skip`). The rule looks only at dtypes, not at the model. Parameter
names and shapes stay those of the plain model, so checkpoints move between engines and world sizes (DCP reshards).
Complex groups get no mixed-precision casts: FSDP casts only floating-point parameters, and a real `reduce_dtype`
would drop a complex gradient's imaginary part.

Reduction: every group is set to sum-only with a divide factor of 1, so FSDP scales neither before nor after the
collective, and what we write into its output buffer is the gradient shard as is: ScatterExchange's mean. Every
compressor, "none" included, goes through ScatterExchange: one path for byte counts, the non-finite flag and the
checkpointed state. Its "none" is gloo's reduce-scatter, which adds like DDP's allreduce: fp32 FSDP2 is DDP bit for
bit at 2 ranks, and within rounding at more (gloo's ring order for an element depends on its offset in the buffer,
and a parameter sits at other offsets in DDP's bucket than in FSDP's group buffer). `parallel.reduce_dtype` is the
dtype FSDP casts gradients to before the exchange; what crosses the wire is the compressor's (fp16/bf16 for 16 bits).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
from torch.distributed.tensor import DTensor

from trainer.compress.scatter import SCATTER_COMPRESSORS, ScatterExchange, check_scatter_config
from trainer.parallel.engine import Engine, ExampleLoss, MakeOptimizer
from trainer.registry import get_model_spec

log = logging.getLogger("fieldtrain")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDP2Engine(Engine):
    name = "fsdp2"
    compressors = SCATTER_COMPRESSORS
    sharded = True

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        check_scatter_config(cfg.comm)   # comm.ef_state must be able to hold the compressor's error feedback

    def __init__(self, cfg, model: nn.Module, device: torch.device, make_optimizer: MakeOptimizer,
                 example_loss: ExampleLoss):
        super().__init__(cfg, model, device, make_optimizer, example_loss)
        model.to(device)
        self.groups: dict[str, nn.Module] = {}
        if self.world_size > 1:   # with one rank there is nothing to shard: the model stays plain, as under DDP
            units = [u for unit in get_model_spec(cfg.model.name).shard_units(model) for u in dtype_units(unit)]
            sizes = [buffer_numel(u, self.world_size) for u in units]   # what `auto` chooses for
            self.exchange = ScatterExchange(cfg.comm, seed=cfg.run.seed, numel=sum(sizes), buffers=len(sizes))
            self.groups = shard_model(model, units, cfg.parallel, device)
            for key, module in self.groups.items():
                module.set_custom_reduce_scatter(ExchangeReduceScatter(self.exchange, key))
                module.set_force_sum_reduction_for_comms(True)
                module.set_gradient_divide_factor(1.0)
                module.set_reduce_scatter_unused_params(True, recurse=False)   # a fixed buffer layout per group
            log.info("fsdp2: %d units (%s) + the root over %d ranks, gradients reduce-scattered by %s", len(units),
                     ", ".join(list(self.groups)[:-1]), self.world_size, self.exchange.compressor.name)
        self.optimizer = make_optimizer(self.model.parameters())

    def stateful(self) -> dict:
        state = super().stateful()
        if "comm" in state:
            state["comm"] = ScatterState(self.exchange)
        return state

    def full_parameters(self) -> list[torch.Tensor]:
        return [p.full_tensor() if isinstance(p, DTensor) else p for p in (q.detach() for q in self.model.parameters())]


class ScatterState(Stateful):
    """The exchange's checkpoint entry, tagged with its layout: reduce-scatter state is kept per FSDP group and shard,
    DDP's per parameter, so state saved by another engine (no tag) is not restored; the run starts it afresh."""
    LAYOUT = "fsdp2-reduce-scatter"

    def __init__(self, exchange):
        self.exchange = exchange

    def state_dict(self) -> dict:
        return {**self.exchange.state_dict(), "layout": self.LAYOUT}

    def load_state_dict(self, state: dict) -> None:
        if state.get("layout") != self.LAYOUT:
            log.warning("resume: the checkpoint's compressor state was kept by another engine (per parameter, not "
                        "per reduce-scatter shard): error feedback and warm starts begin afresh")
            self.exchange.step = int(state["step"])
            return
        self.exchange.load_state_dict({k: v for k, v in state.items() if k != "layout"})

    def per_rank_keys(self) -> list[str]:
        return self.exchange.per_rank_keys()

    def optional_keys(self) -> list[str]:
        """What a checkpoint of another engine's exchange lacks (CheckpointManager.load skips these if absent)."""
        return ["layout", "ef_state"]


def dtype_units(module: nn.Module) -> list[nn.Module]:
    """`module` if its parameters share one dtype, else its children's units followed by `module` itself when it holds
    parameters of its own (which must then share one dtype). Modules without parameters give none."""
    dtypes = {p.dtype for p in module.parameters()}
    if len(dtypes) <= 1:
        return [module] if dtypes else []
    units = [u for child in module.children() for u in dtype_units(child)]
    own = {p.dtype for p in module.parameters(recurse=False)}
    if len(own) > 1:
        raise ValueError(f"{type(module).__name__} holds parameters of dtypes {sorted(map(str, own))} itself; "
                         "parallel.engine = 'fsdp2' shards one dtype per group: move them into submodules, or store "
                         "complex weights as real (..., 2) tensors (model.fno.spectral_weights = \"real\")")
    return units + ([module] if own else [])


def buffer_numel(unit: nn.Module, world_size: int) -> int:
    """Floats in a unit's reduce-scatter buffer: each parameter's dim 0 padded to a multiple of the world size,
    complex elements as two."""
    total = 0
    for p in unit.parameters():
        rows = p.shape[0] if p.dim() else 1
        total += -(-rows // world_size) * world_size * (p.numel() // max(rows, 1)) * (2 if p.is_complex() else 1)
    return total


def shard_model(model: nn.Module, units: list[nn.Module], parallel, device: torch.device) -> dict[str, nn.Module]:
    """fully_shard each unit (of one parameter dtype), then the root; returns the FSDP modules by fully qualified
    name ("" for the root), in the order they were sharded."""
    from torch.distributed.device_mesh import init_device_mesh

    covered = {id(p) for unit in units for p in unit.parameters()}
    rest = {p.dtype for p in model.parameters() if id(p) not in covered}
    if len(rest) > 1:
        raise ValueError(f"{type(model).__name__}: parameters outside its shard units have dtypes "
                         f"{sorted(map(str, rest))}; the root's FSDP group takes them and needs one dtype: list their "
                         "modules in ModelSpec.shard_units")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mixed = MixedPrecisionPolicy(param_dtype=_DTYPES[parallel.param_dtype], reduce_dtype=_DTYPES[parallel.reduce_dtype])
    names = {m: n for n, m in model.named_modules()}
    groups = {}
    for module in [*units, model]:
        floating = all(p.dtype.is_floating_point for p in module.parameters())
        fully_shard(module, mesh=mesh, reshard_after_forward=parallel.reshard_after_forward,
                    mp_policy=mixed if floating else MixedPrecisionPolicy())
        groups[names[module]] = module
    return groups


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """A 1-D buffer as real elements: complex ones as interleaved (re, im), as DDP's buckets hold them."""
    return torch.view_as_real(t).flatten() if t.is_complex() else t


class ExchangeReduceScatter(ReduceScatter):
    """FSDP's reduce-scatter of one group's flat gradient buffer, run by the compressor (ScatterExchange).

    FSDP hands `input_tensor` (W*S elements of the reduce dtype; row k of `input_tensor.view(W, S)` is rank k's
    shard) and then reads `output_tensor` (S elements) as this rank's gradient shard; it ignores the return value.
    With sum-only reduction and a divide factor of 1 it scales neither, so the output is the mean over ranks."""

    def __init__(self, exchange, key: str):
        self.exchange, self.key = exchange, key or "<root>"

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        assert op == dist.ReduceOp.SUM, f"FSDP asked for {op}; every group was set to sum-only reduction"
        mean = self.exchange.reduce_scatter(_as_float(input_tensor).float(), self.key)
        _as_float(output_tensor).copy_(mean)
        return None

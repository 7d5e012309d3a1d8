"""The engine interface: what `Trainer` asks of data parallelism, whatever shards what.

    engine = ENGINES[cfg.parallel.engine](cfg, model, device, make_optimizer, example_loss)
    loss, _ = spec.loss(engine.model, batch, data)     # forward through the engine's module
    engine.backward(loss)                               # gradients exchanged (compressed) on the way
    engine.step(apply=not agreed_nonfinite)             # optimizer step, or a skip that rolls compressor state back

An engine owns the wrapped model, the optimizer built on its (possibly sharded) parameters, and the gradient
exchange. `Trainer` keeps the loop, the scheduler (on `engine.optimizer`), data, checkpoints and the all-ranks
agreement on a non-finite gradient; the engine says whether *this* rank saw one (`local_nonfinite`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from trainer.checkpoint import ModelOptimizerState
from trainer.comm import ExchangeStats

MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
ExampleLoss = Callable[..., torch.Tensor]    # (module, rows=None): the loss of the example batch, or of one of `rows`


class Engine:
    name = "base"
    compressors: tuple[str, ...] = ()     # comm.compressor values this engine carries
    sharded = False                       # parameters (and optimizer state) split across ranks
    hierarchical = False                  # carries comm.hierarchy = "node"

    @classmethod
    def check(cls, cfg) -> None:
        """Config combinations this engine cannot run, as ValueErrors naming the key and the allowed values.
        Called while the config is loaded: before any process group exists or any file is written."""
        if cfg.comm.compressor not in cls.compressors:
            raise ValueError(f"config key 'comm.compressor' = {cfg.comm.compressor!r} cannot run under "
                             f"parallel.engine = {cls.name!r}; allowed there: {', '.join(map(repr, cls.compressors))}")
        if cfg.comm.auto_every and cls.sharded:
            raise ValueError(f"config key 'comm.auto_every' = {cfg.comm.auto_every}: re-deciding `auto` during the "
                             f"run is built for 'ddp'; under parallel.engine = {cls.name!r} auto decides once (0)")
        if cfg.comm.hierarchy != "none" and not cls.hierarchical:
            raise ValueError(f"config key 'comm.hierarchy' = {cfg.comm.hierarchy!r} cannot run under parallel.engine "
                             f"= {cls.name!r} (the two-level exchange is built for 'ddp'); use 'none' there")
        # `auto` chooses among the candidates this engine carries (the default list holds powersgd, which sharded
        # engines cannot carry); none at all is an error.
        if cfg.comm.compressor == "auto" and not any(c in cls.compressors for c in cfg.comm.auto_candidates):
            raise ValueError(f"config key 'comm.auto_candidates' = {cfg.comm.auto_candidates!r}: none can run under "
                             f"parallel.engine = {cls.name!r}; allowed there: "
                             f"{', '.join(repr(c) for c in cls.compressors if c not in ('auto', 'skip'))}")

    @classmethod
    def resume_refusal(cls, saved: dict, new: dict) -> str | None:
        """Why a checkpoint written under the `[parallel]` table `saved` cannot resume under `new` (either side being
        this engine), or None. DDP and FSDP2 checkpoints are plain DCP state dicts: each resumes the other."""
        return None

    def __init__(self, cfg, model: nn.Module, device: torch.device, make_optimizer: MakeOptimizer,
                 example_loss: ExampleLoss):
        self.cfg, self.device = cfg, device
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.model: nn.Module = model                       # what the loss is called on
        self.optimizer: torch.optim.Optimizer | None = None  # a torch optimizer; the scheduler drives its groups
        self.exchange = None                                 # .stats, .local_nonfinite, .end_step(applied), Stateful

    # ---- one step --------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def local_nonfinite(self) -> bool:
        """Whether this rank's gradient held a NaN/Inf (seen by the exchange before compression, where there is one:
        a compressor may hide it, e.g. top-k dropping it or sign mapping it to +-1)."""
        if self.exchange is not None and self.exchange.local_nonfinite:
            return True
        return any(not bool(torch.isfinite(_local(p.grad)).all()) for p in self.model.parameters()
                   if p.grad is not None)

    def clip_grad_norm(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def step(self, apply: bool) -> None:
        """Apply the averaged gradient (apply=True) or skip it; either way the compressor's pending state is
        committed or rolled back to match, and gradients are cleared."""
        if apply:
            if self.cfg.optim.grad_clip > 0:
                self.clip_grad_norm(self.cfg.optim.grad_clip)
            self.optimizer.step()
        if self.exchange is not None:
            self.exchange.end_step(applied=apply)
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ---- what the trainer reports and saves ----------------------------------------------------------------------
    @property
    def stats(self) -> ExchangeStats | None:
        return None if self.exchange is None else self.exchange.stats

    @property
    def compressor_name(self) -> str:
        return getattr(getattr(self.exchange, "compressor", None), "name", self.cfg.comm.compressor)

    def stateful(self) -> dict:
        """This engine's entries of the checkpoint: the model and optimizer, and the compressor state if any."""
        state = {"model_optim": ModelOptimizerState(self.model, self.optimizer)}
        if self.exchange is not None and hasattr(self.exchange, "state_dict"):
            state["comm"] = self.exchange
        return state

    @torch.no_grad()
    def divergence(self) -> float:
        """Max |w - w_rank0| over every parameter (gathered in full for sharded engines) and rank: 0.0 when the
        ranks hold one model."""
        if self.world_size == 1:
            return 0.0
        flat = torch.cat([_real(p).flatten() for p in self.full_parameters()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        diff = (flat - reference).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return diff.item()

    def full_parameters(self) -> list[torch.Tensor]:
        """Every parameter in full on this rank (collective for sharded engines), in `named_parameters` order."""
        return [p.detach() for p in self.model.parameters()]

    # ---- the weights an EMA averages (trainer/ema.py) -----------------------------------------------------------
    def master_weights(self) -> dict[str, torch.Tensor]:
        """This rank's authoritative copy of each parameter (what the optimizer writes and forward reads), by name:
        whole parameters for DDP, this rank's DTensor shards for FSDP2."""
        return dict(_unwrap(self.model).named_parameters())

    def load_master_weights(self, values: dict[str, torch.Tensor]) -> None:
        for n, w in self.master_weights().items():
            w.copy_(values[n])

    def master_weights_for_checkpoint(self, values: dict[str, torch.Tensor]) -> dict:
        """`values` (shaped as master_weights) as DCP entries: replicated tensors or DTensors are saved as they are."""
        return values

    def load_master_weights_from_checkpoint(self, values: dict[str, torch.Tensor], loaded: dict) -> None:
        for n, t in values.items():
            if t is not loaded[n]:
                t.copy_(loaded[n])

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds of parameters, gradients and optimizer state (its shards, for sharded engines)."""
        params = sum(_nbytes(p) for p in self.model.parameters())
        grads = sum(_nbytes(p.grad) for p in self.model.parameters() if p.grad is not None)
        optim = sum(_nbytes(v) for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}

    def close(self) -> None:
        pass


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size() if t.numel() and not t.is_meta else 0



def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (parameter names without 'module.')."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

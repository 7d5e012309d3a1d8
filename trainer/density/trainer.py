"""Training a density sampler with the same `Trainer`: its data source simulates (no store), and `evaluate` is the one
method overridden, computing the estimates of trainer/density/estimators.py.

`SimulationSource` stands where a store's loader stands: each step it hands every rank the description of its rows of
the step's global batch (world size x data.batch_size trajectories); the rows' noise is drawn in the loss
(model.global_noise). It is Stateful (the step it is at), so a resumed run continues the same sequence.
"""

from __future__ import annotations

import json
import logging

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from data.loader import ChannelNormalizer
from trainer.compress.base import mixed_seed
from trainer.density import estimators
from trainer.density.model import global_noise, unwrap
from trainer.density.targets import get_target
from trainer.registry import DataSpec
from trainer.train import Trainer

log = logging.getLogger("fieldtrain")
EVAL_STEP = -1   # the "training step" the evaluation's noise is drawn for (no training step is negative)


class _Plan:
    """What the training loop reads of a shard plan: the run is one epoch of simulated batches."""

    def __init__(self, samples_per_rank: int):
        self.cursor, self.epoch, self.samples_per_rank = 1, 0, samples_per_rank


class SimulationLoader(Stateful):
    def __init__(self, cfg, rank: int, world_size: int):
        self.seed, self.total = cfg.run.seed, cfg.train.max_steps
        self.n, self.world_size, self.rank = cfg.data.batch_size, world_size, rank
        self.step = 0
        self.plan = _Plan(self.n * self.total)
        self.drop_last_batch = True

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        while self.step < self.total:
            batch = {"seed": self.seed, "step": self.step, "total": self.total, "first": self.rank * self.n,
                     "n": self.n, "global_n": self.n * self.world_size}
            self.step += 1
            self.plan.cursor = 0 if self.step == self.total else 1
            yield {k: torch.tensor(v) for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": 0}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def close(self) -> None:
        pass


class SimulationSource:
    """The density sampler's data: its target (validated here, before anything is written) and simulated batches."""

    def __init__(self, cfg, rank: int, world_size: int):
        if not cfg.train.max_steps:
            raise ValueError("config key 'train.max_steps' = 0: a density sampler has no dataset to count epochs "
                             "of; give the number of training steps")
        c = cfg.model.params
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.target = get_target(c.target, **c.target_params)
        x = torch.randn(4, self.target.dim, generator=torch.Generator().manual_seed(0)) * c.sigma
        from trainer.density.targets import checked_log_prob
        checked_log_prob(self.target, x)   # NaN or a wrong shape: a ValueError naming the target, now

    def data_spec(self, device) -> DataSpec:
        d = (self.target.dim,)
        return DataSpec(d, d, ChannelNormalizer([0.0], [1.0]).to(device))

    def identity(self) -> dict:
        c = self.cfg.model.params
        return {"target": c.target, "target_params": c.target_params, "dim": self.target.dim,
                "log_z": self.target.log_z}

    def loader(self) -> SimulationLoader:
        return SimulationLoader(self.cfg, self.rank, self.world_size)


class DensityTrainer(Trainer):
    metric_columns = ("eval_elbo", "eval_iw_log_z", "eval_eubo", "eval_ess", "eval_w2_squared", "eval_log_z_error",
                      "eval_iw_log_z_error", "eval_elbo_se")

    def stateful(self) -> dict:
        """With local search, both replay buffers (each rank's shards) are part of the checkpoint."""
        core = self._buffers()
        return {**super().stateful(), **({"buffer": core.buffer, "buffer_ls": core.buffer_ls}
                                         if core.buffer is not None else {})}

    def _buffers(self):
        core = unwrap(self.model)
        if core.cfg.local_search and core.buffer is None:
            from trainer.density.buffer import ReplayBuffer
            core.buffer, core.buffer_ls = (ReplayBuffer(core.cfg.buffer_size, core.target.dim, self.rank,
                                                        self.world_size) for _ in range(2))
        return core

    def train_step(self, batch) -> float:
        """The step, then (local search) its samples into the first buffer, only when the step was applied on every
        rank (a skipped step's samples may be the non-finite ones), and every ls_every steps MALA from a batch of
        them, its accepted proposals after burn-in into the second buffer."""
        skipped = self.state.skipped_steps
        loss = super().train_step(batch)
        core = self._buffers()
        if core.buffer is None or core.pending is None or self.state.skipped_steps != skipped:
            return loss
        core.buffer.add(*core.pending)
        step, c = int(batch["step"]), core.cfg
        if step % c.ls_every == 0 and len(core.buffer) > 0:
            from trainer.density.buffer import local_search
            g = torch.Generator().manual_seed(mixed_seed(self.cfg.run.seed, step, self.rank, 11))
            x, _ = core.buffer.sample(int(batch["n"]), g)
            x, log_r, acceptance = local_search(core.target, x, c.ls_steps, c.ls_step_size, g,
                                                target_acceptance=c.ls_target_acceptance, burn_in=c.ls_burn_in)
            core.buffer_ls.add(x, log_r)
            log.info("step %d: local search, %d MALA steps, acceptance %.3f, %d samples kept", step, c.ls_steps,
                     acceptance, len(log_r))
        return loss

    @torch.no_grad()
    def evaluate(self) -> float:
        """ELBO, importance-weighted log Z, EUBO (exact target samples pushed backwards, when the target has an
        exact sampler), ESS and W2^2 to exact samples, over model.density_sampler.eval_samples trajectories split
        over the ranks; returns |ELBO - log Z| (or -ELBO when log Z is unknown)."""
        core = unwrap(self.model)
        c, target = core.cfg, core.target
        K, W = c.eval_samples, self.world_size
        lo, hi = self.rank * K // W, (self.rank + 1) * K // W
        n = max(hi - lo, 1)    # every rank runs one forward (sharded engines gather inside it); a pad row is dropped
        seed = mixed_seed(self.cfg.run.seed, 7)
        was_training = self.model.training
        self.model.eval()
        fwd = self.model(n, global_noise(seed, EVAL_STEP, lo, n, max(K, lo + n), target.dim))
        log_w = estimators.log_weights(fwd["log_pf"], fwd["log_pb"], fwd["log_reward"])[:hi - lo]
        x = fwd["x"][:hi - lo]
        back = None
        if target.has_sampler:
            exact = target.sample(K, generator=torch.Generator().manual_seed(seed), dtype=fwd["x"].dtype)
            x1 = exact[lo:lo + n] if hi > lo else exact[:1]
            b = self.model(n, None, x1=x1.to(fwd["x"].device),
                           generator=torch.Generator().manual_seed(mixed_seed(seed, self.rank)))
            back = estimators.log_weights(b["log_pf"], b["log_pb"], b["log_reward"])[:hi - lo]
        self.model.train(was_training)
        log_w, x, back = self._gather(log_w), self._gather(x), None if back is None else self._gather(back)
        if self.rank != 0:
            return 0.0   # the summary's number is rank 0's
        result = {"elbo": estimators.elbo(log_w).item(), "elbo_se": estimators.standard_error(log_w).item(),
                  "iw_log_z": estimators.importance_log_z(log_w).item(),
                  "ess": estimators.ess(log_w).item(), "log_z": target.log_z, "eval_samples": K}
        if back is not None:
            result["eubo"] = estimators.eubo(back).item()
            result["w2_squared"] = estimators.w2_squared(x.double(), exact.double())
        if target.log_z is not None:
            result["log_z_error"] = abs(result["elbo"] - target.log_z)
            result["iw_log_z_error"] = abs(result["iw_log_z"] - target.log_z)
        self.eval_extra = result
        if self.metrics is not None:
            self.metrics.log(self.state.step, **{f"eval_{k}": v for k, v in result.items()
                                                 if isinstance(v, float) and k != "log_z"})
        if self.state.step >= self.total_steps:
            self._figure(x, exact if back is not None else None)
        return result.get("log_z_error", -result["elbo"])

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized() or self.world_size == 1:
            return t.cpu()
        parts = [None] * self.world_size
        dist.all_gather_object(parts, t.cpu())
        return torch.cat(parts)

    def _figure(self, x: torch.Tensor, exact: torch.Tensor | None) -> None:
        from trainer.density.figures import plot_sampler
        out = self.cfg.run_dir / "figures"
        path = plot_sampler(out / "samples.png", unwrap(self.model).target, x, exact,
                            title=f"step {self.state.step}: {len(x)} samples")
        (out / "eval.json").write_text(json.dumps(self.eval_extra, indent=2))
        log.info("figure: %s", path)

"""The training loop: a `Trainer` that owns the model, its data, its optimizer and its checkpoints.

    trainer = Trainer(cfg, device)     # validates the store and config; writes nothing before that
    summary = trainer.train()          # resumes from the latest checkpoint when resume=True

Variants override one method (`forward_backward`), as torchtitan's trainers do; a launcher that keeps
checkpoints elsewhere (Ray Train) overrides `save_checkpoint` and `restore`.

Elastic resume: a checkpoint may be loaded into another world size. The data plan reshards the
interrupted epoch (data/shards.py), the compressor keeps its replicated state and resets per-rank error
feedback (trainer/comm.py), and the learning rate follows the global batch (`batch_lr_scale`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data.loader import ShardedLoader, epoch_batches, evaluation_batches
from data.shards import ChunkShardPlan
from data.store import FieldDataset
from trainer.checkpoint import CheckpointManager, ModelOptimizerState, RNGState
from trainer.comm import GradientExchange
from trainer.config import Config
from trainer.fno import FNO
from trainer.parallelize import parallelize

log = logging.getLogger("fieldtrain")


def relative_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ||pred - target||_2 / ||target||_2, shape (batch,) (the FNO paper's metric and loss)."""
    diff = (pred - target).flatten(1).norm(dim=1)
    return diff / target.flatten(1).norm(dim=1).clamp_min(1e-12)


class TrainState:
    """The trainer's own counters, Stateful for DCP."""

    def __init__(self, world_size: int = 1, global_batch: int = 1):
        self.step = 0
        self.samples_seen = 0
        self.skipped_steps = 0     # steps whose gradient was non-finite on some rank
        self.world_size = world_size          # of the run that saved the state
        self.lr_global_batch = global_batch   # the global batch that optim.lr is meant for (the first world's)

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "skipped_steps": self.skipped_steps,
                "world_size": self.world_size, "lr_global_batch": self.lr_global_batch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self.world_size, self.lr_global_batch = int(state["world_size"]), int(state["lr_global_batch"])


def batch_lr_scale(optimizer: str, global_batch: int, reference_batch: int) -> float:
    """Learning-rate factor when the global batch changes from `reference_batch` to `global_batch`.

    SGD: linear, lr ~ B (Goyal et al. 2017, "Accurate, Large Minibatch SGD"). Adam/AdamW: square root,
    lr ~ sqrt(B) (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms";
    Granziol et al. 2022, "Learning Rates as a Function of Batch Size").
    """
    ratio = global_batch / reference_batch
    return ratio if optimizer == "sgd" else math.sqrt(ratio)


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MetricsLogger:
    """CSV and TensorBoard scalars, rank 0 only."""

    COLUMNS = ("step", "epoch", "train_loss", "test_rel_l2", "lr", "step_time_s", "data_wait_s", "bytes_per_step",
               "compression_ratio", "skipped_steps")

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.rows: list[dict] = []
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"))
            self.csv_path = run_dir / "metrics.csv"

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, **scalars}
        self.rows.append(row)
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        new = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS, restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


class Trainer:
    def __init__(self, cfg: Config, device: torch.device = torch.device("cpu"), resume: bool = False):
        self.cfg, self.device, self.resume = cfg, device, resume
        self.rank, self.world_size = _rank_world()
        if not cfg.data.path:
            raise ValueError("config key 'data.path' is empty: give the dataset URL, e.g. --set data.path=runs/demo/darcy.zarr")
        # Validate everything that can be wrong with the inputs before anything is written.
        self.dataset = FieldDataset(cfg.data.path, cfg.data.storage_options)
        ds = self.dataset
        test_chunks = max(1, round(ds.num_chunks * cfg.data.test_fraction))
        if test_chunks >= ds.num_chunks:
            raise ValueError(f"dataset {ds.url} has {ds.num_chunks} chunks of {ds.chunk_size}; "
                             f"data.test_fraction={cfg.data.test_fraction} leaves none for training")
        self.train_stop = (ds.num_chunks - test_chunks) * ds.chunk_size
        if self.train_stop < self.world_size * cfg.data.batch_size:
            raise ValueError(f"dataset {ds.url}: {self.train_stop} training samples cannot fill one batch of "
                             f"{cfg.data.batch_size} on each of {self.world_size} ranks")
        grid = ds.input_shape[1:]
        if len(cfg.model.modes) != len(grid):
            raise ValueError(f"config key 'model.modes' = {cfg.model.modes} has {len(cfg.model.modes)} entries; "
                             f"dataset {ds.url} has a {len(grid)}-D grid {tuple(grid)}")

        torch.manual_seed(cfg.run.seed)
        self.model = FNO(ds.input_shape[0], ds.target_shape[0], tuple(cfg.model.modes), width=cfg.model.width,
                         n_layers=cfg.model.n_layers, padding=cfg.model.padding,
                         projection_channels=cfg.model.projection_channels,
                         spectral_weights=cfg.model.spectral_weights)
        example = torch.zeros(1, *ds.input_shape)
        self.model(example)  # modes vs grid are checked here, before any write
        self.model, self.exchange = parallelize(self.model, cfg.comm, device, example, seed=cfg.run.seed)
        self.optimizer = self._build_optimizer()

        plan = ChunkShardPlan(self.train_stop, ds.chunk_size, self.world_size, self.rank, seed=cfg.run.seed,
                              shuffle=cfg.data.shuffle, drop_last=cfg.data.drop_last,
                              window_chunks=cfg.data.window_chunks)
        if cfg.data.loader == "ray":
            from data.ray_loader import RayShardedLoader
            self.loader = RayShardedLoader(ds, plan, cfg.data.batch_size, storage_options=cfg.data.storage_options,
                                           prefetch_batches=cfg.data.prefetch,
                                           chunks_per_block=cfg.data.chunks_per_block, read_cpus=cfg.data.read_cpus,
                                           ray_address=cfg.data.ray_address or None, timeout_s=cfg.dist.timeout_s)
        else:
            self.loader = ShardedLoader(ds, plan, cfg.data.batch_size, prefetch=cfg.data.prefetch)
        self.target_norm = self.loader.target_normalizer.to(device)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * len(self.loader)
        self.scheduler = self._build_scheduler()
        self.state = TrainState(self.world_size, self.world_size * cfg.data.batch_size)
        self.checkpoints = CheckpointManager(cfg.run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
        self.stop_requested = False

        if self.rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.metrics = MetricsLogger(cfg.run_dir, enabled=self.rank == 0)

    # ---- construction --------------------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = self.model.parameters()
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, foreach=False)

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        o = self.cfg.optim

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            if o.scheduler == "constant":
                return 1.0
            progress = min(1.0, (step - o.warmup_steps) / max(1, self.total_steps - o.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def stateful(self) -> dict:
        state = {"model_optim": ModelOptimizerState(self.model, self.optimizer), "scheduler": self.scheduler,
                 "data": self.loader, "trainer": self.state, "rng": RNGState(self.rank)}
        if isinstance(self.exchange, GradientExchange):
            state["comm"] = self.exchange
        return state

    # ---- steps ---------------------------------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Relative L2 in physical units (targets decoded with the store's statistics), averaged over the batch."""
        pred = self.target_norm.decode(self.model(x))
        loss = relative_l2(pred, self.target_norm.decode(y)).mean()
        loss.backward()
        return loss

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step, skipped on every rank when any rank's gradient (or loss) is non-finite."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
        if self.exchange is not None:
            nonfinite = self.exchange.local_nonfinite or not math.isfinite(loss.item())
        else:
            nonfinite = not all(bool(torch.isfinite(p.grad).all()) for p in self.model.parameters()
                                if p.grad is not None)
        nonfinite, self.stop_requested = self._agree(nonfinite, self.stop_requested)
        if nonfinite:
            self.state.skipped_steps += 1
            log.warning("step %d: non-finite gradient on some rank; step skipped on all ranks (%d so far)",
                        self.state.step + 1, self.state.skipped_steps)
        else:
            if self.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
        if self.exchange is not None:
            self.exchange.end_step(applied=not nonfinite)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _agree(self, *flags: bool) -> list[bool]:
        """Any rank's flag holds for all ranks (one small allreduce per step)."""
        t = torch.tensor([float(f) for f in flags], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean per-sample relative L2 over the test split, each rank taking a contiguous share."""
        ds = self.dataset
        n_test = ds.num_samples - self.train_stop
        lo = self.train_stop + self.rank * n_test // self.world_size
        hi = self.train_stop + (self.rank + 1) * n_test // self.world_size
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for x, y in evaluation_batches(ds, lo, hi, self.cfg.data.batch_size):
            x, y = x.to(self.device), y.to(self.device)
            err = relative_l2(self.target_norm.decode(self.model(x)), self.target_norm.decode(y))
            total += torch.stack([err.sum().double(), torch.tensor(float(len(err)), dtype=torch.float64)])
        if dist.is_initialized():
            dist.all_reduce(total)
        self.model.train(was_training)
        return (total[0] / total[1]).item()

    @torch.no_grad()
    def replica_divergence(self) -> float:
        """Max |w_rank - w_rank0| over all parameters and ranks: 0.0 when data parallelism is intact."""
        if not dist.is_initialized() or self.world_size == 1:
            return 0.0
        flat = torch.cat([torch.view_as_real(p).flatten() if p.is_complex() else p.flatten()
                          for p in self.model.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        diff = (flat - reference).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return diff.item()

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        return self.checkpoints.save(step, self.stateful())

    def restore(self) -> Path | None:
        """With resume=True, load the run's latest checkpoint (if there is one); returns its path."""
        if not self.resume or self.checkpoints.latest() is None:
            return None
        return self.load_checkpoint(self.checkpoints.latest())

    def load_checkpoint(self, path: str | Path) -> Path:
        path = self.checkpoints.load(self.stateful(), path)
        log.info("resumed from %s at step %d", path, self.state.step)
        if self.state.world_size != self.world_size:
            self._adapt_to_world_size(self.state.world_size)
        return path

    def _adapt_to_world_size(self, saved_world: int) -> None:
        """After loading a checkpoint saved by `saved_world` ranks: rescale the learning rate with the global
        batch, and re-count the steps of an epoch-based run (the data plan and the compressor state reshard
        themselves as they load)."""
        cfg, sched = self.cfg, self.scheduler
        batch = self.world_size * cfg.data.batch_size
        scale = batch_lr_scale(cfg.optim.name, batch, self.state.lr_global_batch)
        sched.base_lrs = [cfg.optim.lr * scale for _ in self.optimizer.param_groups]
        for group, base, lam in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * lam(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if not cfg.train.max_steps:   # the run is cfg.train.epochs epochs: count what is left in new steps
            plan = self.loader.plan
            _, end = epoch_batches(plan, cfg.data.batch_size, self.loader.drop_last_batch)
            in_epoch = -(-max(0, end - plan.cursor) // cfg.data.batch_size)
            self.total_steps = self.state.step + in_epoch + max(0, cfg.train.epochs - plan.epoch - 1) * len(self.loader)
        log.warning("world size %d -> %d: global batch %d -> %d, learning rate x %.6g (%s rule, relative to the "
                    "global batch %d that optim.lr=%g is for) -> base lr %.6g; %d steps in all",
                    saved_world, self.world_size, saved_world * cfg.data.batch_size, batch, scale,
                    "linear" if cfg.optim.name == "sgd" else "square-root", self.state.lr_global_batch,
                    cfg.optim.lr, sched.base_lrs[0], self.total_steps)
        self.state.world_size = self.world_size

    # ---- the loop ------------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return   # e.g. a Ray Train worker runs this in a thread; its launcher handles signals
        def request_stop(signum, _frame):
            log.warning("rank %d: signal %d, checkpointing after this step", self.rank, signum)
            self.stop_requested = True
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, request_stop)

    def train(self, until_step: int | None = None) -> dict:
        """Train to `total_steps` (or stop after `until_step`, checkpointing, as a preemption would)."""
        cfg = self.cfg
        self.restore()
        self._install_signal_handlers()
        pbar = None
        if self.rank == 0 and cfg.train.progress:
            from tqdm import tqdm
            pbar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step",
                        dynamic_ncols=True, leave=True)
        t_start, test_l2, train_loss, bytes_per_step, ratio = time.perf_counter(), float("nan"), float("nan"), 0, 1.0
        window: list[float] = []
        waited = stepped = 0.0   # seconds blocked on the loader / inside train_step, this call
        self.model.train()
        stopped = False
        while self.state.step < self.total_steps and not stopped:
            epoch_at_start = self.loader.state_dict()["epoch"]
            t_ready = time.perf_counter()
            for x, y in self.loader:
                t0 = time.perf_counter()
                loss = self.train_step(x, y)
                data_wait, step_time = t0 - t_ready, time.perf_counter() - t0
                waited, stepped = waited + data_wait, stepped + step_time
                self.state.step += 1
                self.state.samples_seen += len(x) * self.world_size
                window.append(loss)
                if self.exchange is not None:
                    sent, full = self.exchange.stats.reset()
                    bytes_per_step, ratio = sent, full / max(sent, 1)
                step = self.state.step
                end_of_epoch = self.loader.plan.cursor == 0   # the plan rolled over with this batch
                if pbar is not None:
                    pbar.set_postfix(loss=f"{loss:.4f}", epoch=epoch_at_start, refresh=False)
                    pbar.update(1)
                if step % cfg.train.log_every == 0 or step == self.total_steps:
                    train_loss = sum(window) / len(window)
                    window.clear()
                    self.metrics.log(step, epoch=epoch_at_start, train_loss=train_loss,
                                     skipped_steps=self.state.skipped_steps,
                                     lr=self.scheduler.get_last_lr()[0], step_time_s=step_time, data_wait_s=data_wait,
                                     bytes_per_step=bytes_per_step, compression_ratio=ratio)
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or \
                        (not cfg.train.eval_every and end_of_epoch) or step == self.total_steps:
                    test_l2 = self.evaluate()
                    self.metrics.log(step, epoch=epoch_at_start, test_rel_l2=test_l2)
                    if pbar is not None:
                        pbar.write(f"step {step} epoch {epoch_at_start}: test relative L2 {test_l2:.4f}")
                preempted = self.stop_requested   # agreed across ranks in train_step
                if (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or step == self.total_steps \
                        or step == until_step or preempted:
                    self.save_checkpoint(step)
                t_ready = time.perf_counter()   # logging, evaluation and checkpoints are not data wait
                if step >= self.total_steps or step == until_step or preempted:
                    stopped = step != self.total_steps
                    break
        if pbar is not None:
            pbar.close()
        if window:
            train_loss = sum(window) / len(window)
        divergence = self.replica_divergence()
        if divergence > 0:
            log.error("replicas differ after %d steps: max |w - w_rank0| = %.3e", self.state.step, divergence)
        summary = {
            "replica_max_abs_diff": divergence,
            "steps": self.state.step, "total_steps": self.total_steps, "finished": self.state.step >= self.total_steps,
            "epochs": self.state.samples_seen / (self.loader.plan.samples_per_rank * self.world_size),
            "world_size": self.world_size, "train_samples": self.train_stop,
            "test_samples": self.dataset.num_samples - self.train_stop, "train_loss": train_loss,
            "test_rel_l2": test_l2, "wall_time_s": time.perf_counter() - t_start,
            "data_wait_share": waited / max(waited + stepped, 1e-12),
            "grad_bytes_per_step": bytes_per_step, "compression_ratio": ratio, "skipped_steps": self.state.skipped_steps,
            "compressor": getattr(getattr(self.exchange, "compressor", None), "name", cfg.comm.compressor),
        }
        if self.rank == 0:
            tmp = cfg.run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, cfg.run_dir / "summary.json")
        self.loader.close()
        self.metrics.close()
        return summary

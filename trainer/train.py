"""The training loop: a `Trainer` that owns the model, its data, its optimizer and its checkpoints.

    trainer = Trainer(cfg, device)     # validates the store and config; writes nothing before that
    summary = trainer.train()          # resumes from the latest checkpoint when resume=True

The model comes from the registry (`trainer/registry.py`, `model.name`): its ModelSpec builds it and gives its
loss and test error, so this file imports no model. Variants override one method (`forward_backward`), as
torchtitan's trainers do; a launcher that keeps checkpoints elsewhere (Ray Train) overrides `save_checkpoint`
and `restore`.

Elastic resume: a checkpoint may be loaded into another world size. The data plan reshards the
interrupted epoch (data/shards.py), the compressor keeps its replicated state and resets per-rank error
feedback (trainer/comm.py), and the learning rate follows the global batch (trainer/optim.py `batch_lr_scale`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import contextlib
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from data.loader import ChannelNormalizer, ShardedLoader, epoch_batches, evaluation_batches
from data.shards import ChunkShardPlan
from data.store import FieldDataset, format_bad_chunks
from trainer.checkpoint import CheckpointManager, RNGState
from trainer.compress.base import mixed_seed
from trainer.config import RESUME_WHY, Config, resume_changes
from trainer.ema import WeightEMA
from trainer.metrics import MetricsLogger
from trainer.optim import batch_lr_scale, build_optimizer
from trainer.parallel import ENGINES
from trainer.registry import Batch, DataSpec, get_model_spec
from trainer.rundir import RunDirLock, check_fresh_run, clear_run_outputs
from trainer.signals import STOP_SIGNAL, install_stop_handlers

log = logging.getLogger("fieldtrain")


class TrainState:
    """The trainer's own counters, Stateful for DCP, and the run's config and dataset identity (`run_meta`), so a
    checkpoint says what it was trained with wherever it is copied to (Ray Train's storage included)."""

    def __init__(self, world_size: int = 1, global_batch: int = 1, batch_size: int = 1, run_meta: dict | None = None):
        self.step = 0
        self.samples_seen = 0
        self.skipped_steps = 0     # steps whose gradient was non-finite on some rank
        self.world_size = world_size          # of the run that saved the state
        self.batch_size = batch_size          # per rank, of the run that saved the state
        self.lr_global_batch = global_batch   # the global batch that optim.lr is meant for (the first run's)
        self.run_meta = run_meta or {}

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "skipped_steps": self.skipped_steps,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "lr_global_batch": self.lr_global_batch, "run_meta": json.dumps(self.run_meta)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self.world_size, self.lr_global_batch = int(state["world_size"]), int(state["lr_global_batch"])
        # Checkpoints from before batch_size was recorded: assume it is unchanged. run_meta stays this run's.
        self.batch_size = int(state.get("batch_size", self.batch_size))

    def optional_keys(self) -> list[str]:
        """Keys that checkpoints written before they were recorded lack (CheckpointManager.load skips them)."""
        return ["batch_size", "run_meta"]


def read_run_meta(path: str | Path) -> dict | None:
    """The config and dataset identity a checkpoint was written with (None for checkpoints older than that record).
    Reads one small entry; every rank may call it at once (no collective)."""
    path = Path(path)
    if "trainer.run_meta" not in dcp.FileSystemReader(path).read_metadata().state_dict_metadata:
        return None
    holder = {"trainer": {"run_meta": ""}}
    dcp.load(holder, checkpoint_id=path, no_dist=True)
    return json.loads(holder["trainer"]["run_meta"])


def batch_rows(batch: Batch) -> int:
    """Samples in a batch: its "n" entry (a simulated batch: trajectories), else its tensors' leading size."""
    return int(batch["n"]) if "n" in batch else len(next(iter(batch.values())))


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_inputs(cfg: Config, world_size: int) -> tuple[FieldDataset, int]:
    """Open and validate the dataset against the config; returns it and the end of the train split (a sample index).
    Run by every rank, and by `fieldtrain train --nproc` before any rank starts."""
    if not cfg.data.path:
        raise ValueError("config key 'data.path' is empty: give the dataset URL, e.g. --set data.path=runs/demo/darcy.zarr")
    ds = FieldDataset(cfg.data.path, cfg.data.storage_options)
    test_chunks = max(1, round(ds.num_chunks * cfg.data.test_fraction))
    if test_chunks >= ds.num_chunks:
        raise ValueError(f"dataset {ds.url} has {ds.num_chunks} chunks of {ds.chunk_size}; "
                         f"data.test_fraction={cfg.data.test_fraction} leaves none for training")
    train_stop = (ds.num_chunks - test_chunks) * ds.chunk_size
    if train_stop < world_size * cfg.data.batch_size:
        raise ValueError(f"dataset {ds.url}: {train_stop} training samples cannot fill one batch of "
                         f"{cfg.data.batch_size} on each of {world_size} ranks")
    try:
        get_model_spec(cfg.model.name).check(cfg.model.params, data_spec(ds))
    except ValueError as e:
        raise ValueError(f"dataset {ds.url}: {e}") from None
    return ds, train_stop


def data_spec(ds: FieldDataset, device: torch.device = torch.device("cpu")) -> DataSpec:
    """What a model's loss needs from the dataset: sample shapes and the target normaliser (store statistics)."""
    return DataSpec(ds.input_shape, ds.target_shape,
                    ChannelNormalizer.from_stats(ds.normalization()["targets"]).to(device))


def dataset_identity(ds: FieldDataset) -> dict:
    """What makes two stores the same dataset (a copy may live at another URL)."""
    return {"num_samples": ds.num_samples, "chunk_size": ds.chunk_size, "input_shape": list(ds.input_shape),
            "target_shape": list(ds.target_shape), "generator": ds.attrs.get("generator"),
            "params": ds.attrs.get("params"), "normalization": ds.attrs.get("normalization")}


def agree_errors(error: str | None) -> None:
    """Raise the same ValueError on every rank when any rank found a problem (so none waits in a collective)."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    found = [(r, e) for r, e in enumerate(errors) if e]
    if found:
        rank, message = found[0]
        raise ValueError(message if len(errors) == 1 else f"{message} (found by rank {rank})")


def _capture(fn, *args):
    """fn(*args) -> (result, None), or (None, message) for a user error, to be agreed across ranks."""
    try:
        return fn(*args), None
    except ValueError as e:
        return None, str(e)


def check_resumable(cfg: Config, ds: FieldDataset | dict, path: Path, log_changes: bool = True) -> dict[str, list]:
    """Compare `cfg` with the config checkpoint `path` was written under: refuse (ValueError naming the keys and both
    values) what cannot load or would make it another run, log what changes; returns the changes by rule
    (`resume_changes`; empty for a checkpoint that recorded no config)."""
    meta = read_run_meta(path)
    if meta is None:   # written before checkpoints carried their config
        legacy = cfg.run_dir / "config.json"
        if not legacy.is_file():
            log.warning("checkpoint %s does not record its config; resuming without comparing configs", path)
            return {}
        meta = {"config": json.loads(legacy.read_text()), "dataset": None}
    saved = meta["config"]
    changes = resume_changes(saved, cfg.to_dict())
    old_p = {"engine": "ddp", "zero_stage": 1, **saved.get("parallel", {})}   # before [parallel], every run was DDP
    new_p = cfg.to_dict()["parallel"]
    for engine in dict.fromkeys([old_p["engine"], new_p["engine"]]):
        why = ENGINES[engine].resume_refusal(old_p, new_p) if engine in ENGINES else None
        if why:
            raise ValueError(f"--resume from {path}: parallel.engine {old_p['engine']!r} (zero_stage "
                             f"{old_p['zero_stage']}) in the checkpoint, {new_p['engine']!r} (zero_stage "
                             f"{new_p['zero_stage']}) now: {why}")
    if changes["refuse"]:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in changes["refuse"])
        raise ValueError(f"--resume from {path}: the config differs in keys that cannot change on resume: {listed}. "
                         "Resume with the checkpoint's values, or start another run (another run.name, or "
                         "--overwrite to replace this one)")
    now = ds if isinstance(ds, dict) else dataset_identity(ds)
    if meta.get("dataset") and meta["dataset"] != now:
        differ = [k for k in now if meta["dataset"].get(k) != now[k]]
        raise ValueError(f"--resume from {path}: data.path {cfg.data.path!r} is not the dataset the run was trained "
                         f"on ({saved['data']['path']!r}); they differ in {differ}")
    for rule, items in changes.items() if log_changes else ():
        for key, a, b in items:
            log.warning("resume: %s changed from %r to %r (%s)", key, a, b, RESUME_WHY[rule])
    return changes


class Trainer:
    metric_columns: tuple[str, ...] = ()   # metrics.csv columns an evaluate() override logs beside the usual ones

    def __init__(self, cfg: Config, device: torch.device = torch.device("cpu"), resume: bool = False,
                 overwrite: bool = False):
        self.cfg, self.device, self.resume, self.overwrite = cfg, device, resume, overwrite
        self.rank, self.world_size = _rank_world()
        self._closing = ExitStack()   # everything train() or a failed __init__ must release
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        self.spec = get_model_spec(cfg.model.name)
        # Validate everything that can be wrong with the inputs before anything is written. The model's data come
        # from a store (the default) or from its own source (a density sampler simulates its batches).
        source_cls = self.spec.source_class()
        self.source, self.dataset, self.train_stop = None, None, 0
        if source_cls is None:
            checked, error = _capture(check_inputs, cfg, self.world_size)
            if error is None:
                self.dataset, self.train_stop = checked
                error = self._verify_test_split()
        else:
            self.source, error = _capture(source_cls, cfg, self.rank, self.world_size)
        agree_errors(error)
        ds = self.dataset
        self.data = data_spec(ds, self.device) if self.source is None else self.source.data_spec(self.device)
        torch.manual_seed(cfg.run.seed)
        self.model = self.spec.build(cfg.model.params, self.data)
        self.param_shapes = [(tuple(p.shape), p.is_complex()) for p in self.model.parameters() if p.requires_grad]
        example = self.spec.example_batch(self.data)
        with torch.no_grad():
            self.spec.loss(self.model, example, self.data)   # shapes are checked here, before any write

        # One run per run directory: the lock, then the checkpoint's config against this one, then writes.
        self.lock = RunDirLock(cfg.run_dir)
        self.checkpoints = CheckpointManager(cfg.run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
        self._closing.callback(self.lock.release)
        _, error = _capture(self._claim_run_dir)
        agree_errors(error)
        self.resume_from, error = _capture(lambda: self.checkpoints.latest() if self.resume else None)
        self.resume_changes: dict[str, list] = {}
        if error is None and self.resume_from is not None:
            self.resume_changes, error = _capture(check_resumable, cfg, self.identity(), self.resume_from)
        agree_errors(error)

        example = self._example = {k: v.to(self.device) for k, v in example.items()}

        def example_loss(m: torch.nn.Module, rows: int | None = None) -> torch.Tensor:
            batch = example if rows is None else {k: v.to(self.device)
                                                  for k, v in self.spec.example_batch(self.data, rows).items()}
            return self.spec.loss(m, batch, self.data)[0]
        self.engine = ENGINES[cfg.parallel.engine](cfg, self.model, self.device, self._build_optimizer, example_loss)
        self._closing.callback(self.engine.close)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        self.ema = WeightEMA(cfg.ema, self.engine) if cfg.ema.kind != "none" else None
        # The model is built: from here each rank draws its own random numbers (a loss's noise, e.g. EDM's sigmas).
        torch.manual_seed(mixed_seed(cfg.run.seed, self.rank))
        plan = None if ds is None else ChunkShardPlan(
            self.train_stop, ds.chunk_size, self.world_size, self.rank, seed=cfg.run.seed, shuffle=cfg.data.shuffle,
            drop_last=cfg.data.drop_last, window_chunks=cfg.data.window_chunks)
        if self.source is not None:
            self.loader = self.source.loader()
        elif cfg.data.loader == "ray":
            from data.ray_loader import RayShardedLoader
            self.loader = RayShardedLoader(ds, plan, cfg.data.batch_size, storage_options=cfg.data.storage_options,
                                           prefetch_batches=cfg.data.prefetch,
                                           chunks_per_block=cfg.data.chunks_per_block, read_cpus=cfg.data.read_cpus,
                                           ray_address=cfg.data.ray_address or None, timeout_s=cfg.dist.timeout_s)
        else:
            self.loader = ShardedLoader(ds, plan, cfg.data.batch_size, prefetch=cfg.data.prefetch)
        self._closing.callback(self.loader.close)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * len(self.loader)
        self.scheduler = self._build_scheduler()
        self.state = TrainState(self.world_size, self.world_size * cfg.data.batch_size, cfg.data.batch_size,
                                run_meta={"config": cfg.to_dict(), "dataset": self.identity()})
        self.stop_requested = False
        self.eval_extra: dict = {}   # numbers an evaluate() override adds to summary.json
        self.peak_memory: dict[str, int] = {}   # this rank's parameters + gradients + optimizer state, in bytes
        self.metrics: MetricsLogger | None = None   # opened by train(), once the step to resume from is known
        if self.rank == 0:
            (cfg.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def identity(self) -> dict:
        """What the run trains on, recorded in checkpoints and compared on resume."""
        return dataset_identity(self.dataset) if self.source is None else self.source.identity()

    def _verify_test_split(self) -> str | None:
        """Read this rank's share of the test chunks (checksums included): a bad one would surface only at the end."""
        ds = self.dataset
        first = self.train_stop // ds.chunk_size
        mine = list(range(first, ds.num_chunks))[self.rank::self.world_size]
        bad = ds.verify(mine) if mine else []
        if not bad:
            return None
        return (f"{format_bad_chunks(ds.url, bad)}\nthese are in the test split (chunks {first}..{ds.num_chunks - 1}); "
                f"`fieldtrain data verify {ds.url}` checks the whole store")

    def _claim_run_dir(self) -> None:
        """Rank 0 locks the run directory and applies the fresh-run rule; every rank learns the outcome."""
        if self.rank != 0:
            return
        self.lock.acquire()
        check_fresh_run(self.cfg.run_dir, self.resume, self.overwrite)
        if self.overwrite:
            removed = clear_run_outputs(self.cfg.run_dir)
            if removed:
                log.warning("--overwrite: removed %s from %s", ", ".join(removed), self.cfg.run_dir)

    def close(self) -> None:
        """Release what this trainer holds (loader threads and Ray, writers, the run-directory lock); idempotent."""
        self._closing.close()

    # ---- construction --------------------------------------------------------------------------------------
    def _build_optimizer(self, params) -> torch.optim.Optimizer:
        """The configured optimizer over `params` (the engine calls it on its own, possibly sharded, parameters, while
        self.model is still the module it wraps), in the model's learning-rate groups (trainer/optim.py)."""
        return build_optimizer(self.cfg.optim, self.model, params)

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        o = self.cfg.optim

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            if o.scheduler == "constant":
                return 1.0
            if o.scheduler == "step":                   # torch's StepLR after the warm-up
                return o.gamma ** ((step - o.warmup_steps) // o.step_size)
            progress = min(1.0, (step - o.warmup_steps) / max(1, self.total_steps - o.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def stateful(self) -> dict:
        return {**self.engine.stateful(), **({"ema": self.ema} if self.ema is not None else {}),
                "scheduler": self.scheduler, "data": self.loader, "trainer": self.state, "rng": RNGState(self.rank)}

    # ---- steps ---------------------------------------------------------------------------------------------
    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """The model's loss (its ModelSpec's) on one batch, backpropagated; the one method variants override."""
        loss, _metrics = self.spec.loss(self.model, batch, self.data)
        self.engine.backward(loss)
        return loss

    def train_step(self, batch: Batch) -> float:
        """One optimizer step, skipped on every rank when any rank's gradient (or loss) is non-finite."""
        self.engine.zero_grad()
        loss = self.forward_backward({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        nonfinite = self.engine.local_nonfinite() or not math.isfinite(loss.item())
        if self.state.step < 3:   # parameters, gradients and (from the second step) optimizer state all live here
            mem = self.engine.memory()
            if mem["total"] > self.peak_memory.get("total", -1):
                self.peak_memory = mem
        # The handler only raises a local flag; the stop itself is agreed here, so every rank checkpoints at one step.
        nonfinite, self.stop_requested = self._agree(nonfinite, STOP_SIGNAL.is_set())
        if nonfinite:
            self.state.skipped_steps += 1
            log.warning("step %d: non-finite gradient on some rank; step skipped on all ranks (%d so far)",
                        self.state.step + 1, self.state.skipped_steps)
        self.engine.step(apply=not nonfinite)
        if not nonfinite:
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update()
        return loss.item()

    def _max_over_ranks(self, counts: dict[str, int]) -> dict[str, int]:
        """Each count's maximum over ranks (the most loaded rank is what must fit)."""
        keys = sorted(counts)
        t = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and keys:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return {k: int(v) for k, v in zip(keys, t.tolist())}

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
        bs = self.cfg.data.batch_size
        # Sharded engines gather parameters inside forward, so every rank runs the same number of forwards: a rank
        # with fewer batches (or, with fewer test samples than ranks, none) repeats the example batch and adds
        # nothing to the sums.
        W = self.world_size
        rounds = max(-(-((r + 1) * n_test // W - r * n_test // W) // bs) for r in range(W))   # the largest share
        done = 0
        for x, y in (evaluation_batches(ds, lo, hi, bs) if lo < hi else ()):   # streamed: the split may be large
            err = self.spec.evaluate(self.model, {"x": x.to(self.device), "y": y.to(self.device)}, self.data)
            total += torch.stack([err.sum().double(), torch.tensor(float(len(err)), dtype=torch.float64)])
            done += 1
        for _ in range(rounds - done if self.engine.sharded else 0):
            self.spec.evaluate(self.model, self._example, self.data)
        if dist.is_initialized():
            dist.all_reduce(total)
        self.model.train(was_training)
        return (total[0] / total[1]).item()

    def replica_divergence(self) -> float:
        """Max |w_rank - w_rank0| over all (gathered) parameters and ranks: 0.0 when data parallelism is intact."""
        return self.engine.divergence()

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        return self.checkpoints.save(step, self.stateful())

    def restore(self) -> Path | None:
        """With resume=True, load the run's latest checkpoint (if there is one); returns its path."""
        if self.resume_from is None:
            return None
        return self.load_checkpoint(self.resume_from)

    def load_checkpoint(self, path: str | Path) -> Path:
        state = self.stateful()
        saved = dcp.FileSystemReader(Path(path)).read_metadata().state_dict_metadata
        if "comm" in state and (not any(k.startswith("comm.") for k in saved) or self.resume_changes.get("reset")):
            del state["comm"]    # another compressor (or none) saved it: this one starts afresh
            log.warning("resume: the compressor's state is not restored (%s); error feedback and warm starts begin "
                        "afresh", ", ".join(k for k, *_ in self.resume_changes.get("reset", [])) or "none saved")
        path = self.checkpoints.load(state, path)
        log.info("resumed from %s at step %d", path, self.state.step)
        exchange = self.engine.exchange
        if "comm" not in state and exchange is not None and hasattr(exchange, "step"):
            exchange.step = self.state.step
        self._apply_config_on_resume()
        return path

    def _apply_config_on_resume(self) -> None:
        """After loading a checkpoint: this config's optimizer settings replace the saved ones, the learning rate
        follows the global batch (world size x data.batch_size; an elastic change when it differs from the saved
        run's), and an epoch-based run re-counts its steps. The data plan and the compressor state reshard
        themselves as they load. Nothing changes numerically when nothing in the config changed."""
        cfg, sched, st = self.cfg, self.scheduler, self.state
        batch = self.world_size * cfg.data.batch_size
        scale = batch_lr_scale(cfg.optim.name, batch, st.lr_global_batch)
        sched.base_lrs = [cfg.optim.lr * scale * g.get("lr_multiplier", 1.0) for g in self.optimizer.param_groups]
        for group, base, lam in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * lam(sched.last_epoch)
            group["weight_decay"] = cfg.optim.weight_decay
            if cfg.optim.name == "sgd":
                group["momentum"] = cfg.optim.momentum
            else:
                group["betas"] = tuple(cfg.optim.betas)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        saved_batch = st.world_size * st.batch_size
        if batch == saved_batch and st.world_size == self.world_size:
            return
        if not cfg.train.max_steps and self.dataset is not None:   # epochs of a store: count what is left in steps
            plan = self.loader.plan
            _, end = epoch_batches(plan, cfg.data.batch_size, self.loader.drop_last_batch)
            in_epoch = -(-max(0, end - plan.cursor) // cfg.data.batch_size)
            self.total_steps = st.step + in_epoch + max(0, cfg.train.epochs - plan.epoch - 1) * len(self.loader)
        log.warning("world size %d -> %d, batch per rank %d -> %d: global batch %d -> %d, learning rate x %.6g "
                    "(%s rule, relative to the global batch %d that optim.lr=%g is for) -> base lr %.6g; %d steps "
                    "in all", st.world_size, self.world_size, st.batch_size, cfg.data.batch_size, saved_batch, batch,
                    scale, "linear" if cfg.optim.name == "sgd" else "square-root", st.lr_global_batch, cfg.optim.lr,
                    cfg.optim.lr * scale, self.total_steps)
        st.world_size, st.batch_size = self.world_size, cfg.data.batch_size

    # ---- the loop ------------------------------------------------------------------------------------------
    def train(self, until_step: int | None = None) -> dict:
        """Train to `total_steps` (or stop after `until_step`, checkpointing, as a preemption would)."""
        try:
            return self._train(until_step)
        finally:
            self.close()

    def _train(self, until_step: int | None) -> dict:
        cfg = self.cfg
        self.restore()
        self.metrics = MetricsLogger(cfg.run_dir, enabled=self.rank == 0, start_step=self.state.step,
                                     extra_columns=self.metric_columns)
        self._closing.callback(self.metrics.close)
        install_stop_handlers()
        pbar = None
        if self.rank == 0 and cfg.train.progress:
            from tqdm import tqdm
            pbar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step",
                        dynamic_ncols=True, leave=True)
            self._closing.callback(pbar.close)
        t_start, test_l2, train_loss, bytes_per_step, ratio = time.perf_counter(), float("nan"), float("nan"), 0, 1.0
        exchange_s = 0.0
        window: list[float] = []
        waited = stepped = 0.0   # seconds blocked on the loader / inside train_step, this call
        self.model.train()
        stopped = preempted = False
        while self.state.step < self.total_steps and not stopped:
            epoch_at_start = self.loader.state_dict()["epoch"]
            t_ready = time.perf_counter()
            for item in self.loader:   # (x, y) from a store's loader, or a dict from a model's own source
                batch = item if isinstance(item, dict) else {"x": item[0], "y": item[1]}
                t0 = time.perf_counter()
                loss = self.train_step(batch)
                data_wait, step_time = t0 - t_ready, time.perf_counter() - t0
                waited, stepped = waited + data_wait, stepped + step_time
                self.state.step += 1
                self.state.samples_seen += batch_rows(batch) * self.world_size
                window.append(loss)
                if self.engine.stats is not None:
                    sent, full, exchange_s = self.engine.stats.reset()
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
                                     bytes_per_step=bytes_per_step, compression_ratio=ratio, exchange_s=exchange_s)
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or \
                        (not cfg.train.eval_every and end_of_epoch) or step == self.total_steps:
                    with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
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
            "preempted": preempted and self.state.step < self.total_steps,
            "epochs": self.state.samples_seen / (self.loader.plan.samples_per_rank * self.world_size),
            "world_size": self.world_size, "train_samples": self.train_stop,
            "test_samples": 0 if self.dataset is None else self.dataset.num_samples - self.train_stop,
            "train_loss": train_loss,
            "test_rel_l2": test_l2, "wall_time_s": time.perf_counter() - t_start,
            "data_wait_share": waited / max(waited + stepped, 1e-12),
            "grad_bytes_per_step": bytes_per_step, "compression_ratio": ratio, "exchange_s": exchange_s,
            "skipped_steps": self.state.skipped_steps,
            "compressor": self.engine.compressor_name, "engine": self.engine.name, "ema": self.cfg.ema.kind,
            "peak_memory_bytes": self._max_over_ranks(self.peak_memory),
            "param_shapes": [[list(shape), c] for shape, c in self.param_shapes], **self.eval_extra,
        }
        if self.rank == 0:
            tmp = cfg.run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, cfg.run_dir / "summary.json")
        return summary

"""`fieldtrain launch ray CONFIG --address ADDR --workers MIN[..MAX]`: our Trainer inside Ray Train.

The driver (this process) validates the config, connects to the cluster and runs a `TorchTrainer`
(Ray Train v2, the default in Ray 2.60) whose workers each build a `RayTrainTrainer`. Ray Train starts
the worker group, sets RANK/WORLD_SIZE/MASTER_ADDR/... and initialises torch.distributed itself (gloo on
CPU workers, NCCL on GPU workers); `launch.rendezvous.init_distributed` then finds that process group
and uses it.

Checkpoints: every checkpoint the trainer writes (DCP, atomically, in `<run_dir>/checkpoints`) is also
reported to Ray with `ray.train.report`, each rank handing over only the files it wrote, so Ray merges
them into one complete checkpoint under `--storage-path` (a directory or an object-store URL such as
s3://bucket/prefix) on shared and non-shared file systems alike. A (re)started worker group restores
from `ray.train.get_checkpoint()` when Ray has one, else from the run's own latest checkpoint.

Failures: a worker that dies (SIGKILL, a lost node) makes Ray tear the group down and start it again,
up to `--max-failures` times; training continues from the last reported checkpoint and, on
deterministic CPU settings, ends with bit-identical parameters.

Elastic: `--workers 2..4` gives Ray Train v2 a worker range (`ScalingConfig(num_workers=(2, 4))`): it
starts as many workers as the cluster has resources for (at least MIN) and resizes the group, restarting
it from the last checkpoint, when resources change. The trainer then reshards the data plan and the
compressor state and rescales the learning rate with the global batch (trainer/train.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path


from launch.run import run_training
from trainer.config import Config, load_config
from trainer.train import Trainer

log = logging.getLogger("fieldtrain")


def parse_workers(text: str) -> tuple[int, int]:
    """`N` or `MIN..MAX` -> (min, max)."""
    lo, sep, hi = text.partition("..")
    try:
        low, high = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise ValueError(f"--workers {text!r}: give a count N or a range MIN..MAX, e.g. --workers 2..4") from None
    if low < 1 or low > high:
        raise ValueError(f"--workers {text!r}: need 1 <= MIN <= MAX, e.g. --workers 2..4")
    return low, high


def _absolute(cfg_overrides: list[str], cfg: Config) -> list[str]:
    """Overrides that pin relative local paths to the driver's working directory (workers run elsewhere)."""
    extra = [f"run.out_dir={Path(cfg.run.out_dir).resolve()}"]
    if "://" not in cfg.data.path and not Path(cfg.data.path).is_absolute():
        extra.append(f"data.path={Path(cfg.data.path).resolve()}")
    return [*cfg_overrides, *extra]


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a fix, when nothing listens at a host:port address (ray.init would retry for a minute)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address!r}: expected HOST:PORT (the head's GCS, e.g. 10.0.0.1:6379), "
                         "ray://HOST:PORT, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"--address {address}: no Ray cluster reachable there ({e}); start one with "
                         "`ray start --head --port PORT` (or `ray up launch/ray_cluster.yaml`) and pass the head's "
                         "address") from None


class RayTrainTrainer(Trainer):
    """The Trainer with its checkpoints also reported to, and restored from, Ray Train's storage."""

    def save_checkpoint(self, step: int) -> Path:
        import ray.train
        path = super().save_checkpoint(step)
        # On a file system the ranks do not share, only rank 0's node has the renamed directory.
        source = path if path.is_dir() else path.with_name(path.name + ".tmp")
        stage = path.parent / f".ray_stage_rank{self.rank}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        for f in source.iterdir():   # DCP names each rank's files __<rank>_<i>.distcp; rank 0 adds .metadata
            if f.name.startswith(f"__{self.rank}_") or (self.rank == 0 and not f.name.startswith("__")):
                os.link(f, stage / f.name)
        try:
            ray.train.report({"step": step, "epoch": self.loader.plan.epoch},
                             checkpoint=ray.train.Checkpoint.from_directory(str(stage)),
                             checkpoint_dir_name=path.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return path

    def restore(self) -> Path | None:
        import ray.train
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return super().restore()
        with checkpoint.as_directory() as directory:
            log.info("restoring from Ray Train's checkpoint %s", checkpoint.path)
            return self.load_checkpoint(directory)


def train_worker(args: dict) -> None:
    """One Ray Train worker: the body of `fieldtrain train`, on the process group Ray Train set up."""
    import ray.train

    ctx = ray.train.get_context()
    fieldtrain_log = logging.getLogger("fieldtrain")
    if not fieldtrain_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{ctx.get_world_rank()}] %(levelname)s %(message)s",
                                               datefmt="%H:%M:%S"))
        fieldtrain_log.addHandler(handler)
        fieldtrain_log.setLevel(logging.INFO if ctx.get_world_rank() == 0 else logging.WARNING)
        fieldtrain_log.propagate = False
    cfg = load_config(args["config_name"], args["overrides"], text=args["config_text"])
    ctx_rank = ctx.get_world_rank()
    workers = cfg.run_dir / "workers"   # who is who, for operators (and the failure test)
    workers.mkdir(parents=True, exist_ok=True)
    (workers / f"rank{ctx_rank}.json").write_text(json.dumps(
        {"pid": os.getpid(), "rank": ctx_rank, "world_size": ctx.get_world_size(), "node": socket.gethostname()}))
    from trainer.registry import get_model_spec
    model_trainer = get_model_spec(cfg.model.name).trainer_class()   # e.g. the diffusion trainer's evaluate
    trainer_cls = RayTrainTrainer if model_trainer is None else type(
        f"RayTrain{model_trainer.__name__}", (RayTrainTrainer, model_trainer), {})
    run_training(cfg, resume=True, trainer_cls=trainer_cls)


def launch_ray(config: str, overrides: list[str], address: str, workers: str, storage_path: str | None = None,
               max_failures: int = 0, cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0,
               resize_interval_s: float = 60.0) -> int:
    """Run the training on a Ray cluster; returns 0 when it finished, 1 when Ray gave up on it."""
    low, high = parse_workers(workers)
    if max_failures < -1:
        raise ValueError(f"--max-failures {max_failures}: give K >= 0, or -1 for no limit")
    if resize_interval_s <= 0:
        raise ValueError(f"--resize-interval {resize_interval_s}: give seconds > 0")
    if gpus_per_worker < 0 or (cpus_per_worker is not None and cpus_per_worker <= 0):
        raise ValueError(f"--cpus-per-worker {cpus_per_worker} / --gpus-per-worker {gpus_per_worker}: "
                         "need CPUs > 0 and GPUs >= 0")
    cfg = load_config(config, overrides)          # a bad config fails here, before any cluster is touched
    if not cfg.data.path:
        raise ValueError("config key 'data.path' is empty: give the dataset URL, e.g. --set data.path=s3://bucket/x.zarr")
    overrides = _absolute(overrides, cfg)
    cfg = load_config(config, overrides)
    _check_reachable(address)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as e:
        raise ValueError(f"--address {address}: could not join the Ray cluster ({e}). If the cluster uses token "
                         "authentication (new local clusters in Ray >= 2.5x do), run with RAY_AUTH_MODE=token and "
                         "the cluster's ~/.ray/auth_token") from None
    try:
        # Fractional CPUs leave room for Ray Data read tasks on small CPU nodes (or the two deadlock).
        cpus = cpus_per_worker if cpus_per_worker is not None else (1.0 if gpus_per_worker else 0.5)
        resources = {"CPU": cpus, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        storage = storage_path or str(Path(cfg.run.out_dir) / "ray")
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config_name": config, "config_text": Path(config).read_text(), "overrides": overrides},
            torch_config=TorchConfig(backend=None if cfg.dist.backend == "auto" else cfg.dist.backend,
                                     timeout_s=cfg.dist.timeout_s),
            scaling_config=ScalingConfig(num_workers=low if low == high else (low, high),
                                         use_gpu=bool(gpus_per_worker), resources_per_worker=resources,
                                         elastic_resize_monitor_interval_s=resize_interval_s),
            run_config=RunConfig(name=cfg.run.name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
        )
        log.info("Ray Train: %s workers (%s per worker), checkpoints to %s/%s, up to %d restarts",
                 workers, resources, storage, cfg.run.name, max_failures)
        try:
            result = trainer.fit()
        except Exception as e:   # Ray Train v2 raises TrainingFailedError once max_failures is spent
            log.error("Ray Train gave up on %s: %s", cfg.run.name, e)
            return 1
        log.info("Ray Train finished %s; last checkpoint %s", cfg.run.name,
                 result.checkpoint.path if result.checkpoint else None)
        return 0
    finally:
        ray.shutdown()

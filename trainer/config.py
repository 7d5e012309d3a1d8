"""Typed run configuration: nested dataclasses loaded from TOML, with dotted overrides.

    cfg = load_config("configs/darcy_fno.toml", overrides=["optim.lr=1e-3", "train.epochs=5"])

Every section is a dataclass validated in `__post_init__`; an unknown section or key, or a bad value,
is a `ValueError` that names the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"config key {key!r} = {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _positive(key: str, value: float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"config key {key!r} = {value!r}; must be {'>= 0' if zero_ok else '> 0'}")


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"          # the run directory is out_dir/name
    seed: int = 0
    deterministic: bool = True     # torch.use_deterministic_algorithms and one intra-op thread per rank
    threads_per_rank: int = 0      # 0: cores // local ranks

    def __post_init__(self):
        for k in ("name", "out_dir"):
            if not getattr(self, k).strip():
                raise ValueError(f"config key 'run.{k}' is empty; give a directory name")
        if "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"config key 'run.name' = {self.name!r}; must be one directory name (no '/'), the run "
                             "directory is run.out_dir/run.name")
        _positive("run.seed", self.seed, zero_ok=True)
        _positive("run.threads_per_rank", self.threads_per_rank, zero_ok=True)


@dataclass
class DataConfig:
    path: str = ""                 # any fsspec URL or plain path of a dataset group
    storage_options: dict = field(default_factory=dict)
    test_fraction: float = 0.1     # trailing whole chunks held out for evaluation
    batch_size: int = 16           # per rank
    shuffle: bool = True
    drop_last: bool = True         # equal samples per rank: drop the stream's tail (True) or pad it (False)
    window_chunks: int = 4         # shuffle window of the loader, in chunks
    prefetch: int = 4              # batches read ahead (the background thread, or Ray's iterator)
    loader: str = "direct"         # "direct": a thread per rank reads its chunks; "ray": Ray Data tasks
    ray_address: str = ""          # loader = "ray": an existing cluster ("auto", "ray://..."); empty: start one
    chunks_per_block: int = 16     # loader = "ray": chunks per read task (size blocks to >= ~10 MB)
    read_cpus: float = 0.25        # loader = "ray": CPUs per read task (fractional, or Ray Data deadlocks on few cores)

    def __post_init__(self):
        _choice("data.loader", self.loader, ("direct", "ray"))
        _positive("data.chunks_per_block", self.chunks_per_block)
        _positive("data.read_cpus", self.read_cpus)
        if not isinstance(self.storage_options, dict):
            raise ValueError(f"config key 'data.storage_options' = {self.storage_options!r}; must be a table")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"config key 'data.test_fraction' = {self.test_fraction!r}; must be in (0, 1)")
        for k in ("batch_size", "window_chunks", "prefetch"):
            _positive(f"data.{k}", getattr(self, k))


@dataclass
class ModelConfig:
    name: str = "fno"
    width: int = 32
    modes: list = field(default_factory=lambda: [12, 12])
    n_layers: int = 4
    padding: int = 0
    projection_channels: int = 128
    spectral_weights: str = "complex"   # "real" stores them as (..., 2) float tensors

    def __post_init__(self):
        from trainer.registry import get_model_spec   # the registry lives next to the models
        get_model_spec(self.name)
        _choice("model.spectral_weights", self.spectral_weights, ("complex", "real"))
        if not self.modes or not all(isinstance(m, int) and m > 0 for m in self.modes):
            raise ValueError(f"config key 'model.modes' = {self.modes!r}; must be a list of positive ints")
        for k in ("width", "n_layers", "projection_channels"):
            _positive(f"model.{k}", getattr(self, k))
        _positive("model.padding", self.padding, zero_ok=True)


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9          # sgd only
    scheduler: str = "cosine"      # per step over the whole run
    warmup_steps: int = 0
    grad_clip: float = 0.0         # 0: off

    def __post_init__(self):
        _choice("optim.name", self.name, ("adam", "adamw", "sgd"))
        _choice("optim.scheduler", self.scheduler, ("cosine", "constant"))
        _positive("optim.lr", self.lr)
        _positive("optim.weight_decay", self.weight_decay, zero_ok=True)
        _positive("optim.warmup_steps", self.warmup_steps, zero_ok=True)
        _positive("optim.grad_clip", self.grad_clip, zero_ok=True)
        if (len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.betas)
                or not all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"config key 'optim.betas' = {self.betas!r}; must be two numbers in [0, 1)")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"config key 'optim.momentum' = {self.momentum!r}; must be in [0, 1)")


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0             # 0: epochs * batches per epoch; else stop (and schedule) at this step
    log_every: int = 10
    eval_every: int = 0            # steps; 0: at the end of each epoch
    ckpt_every: int = 0            # steps; 0: at the end of the run only
    keep_checkpoints: int = 2
    progress: bool = True          # a progress bar on rank 0

    def __post_init__(self):
        _positive("train.epochs", self.epochs)
        for k in ("max_steps", "eval_every", "ckpt_every"):
            _positive(f"train.{k}", getattr(self, k), zero_ok=True)
        _positive("train.log_every", self.log_every)
        _positive("train.keep_checkpoints", self.keep_checkpoints)


@dataclass
class CommConfig:
    """The gradient exchange (the DDP communication hook) and its compressor."""
    compressor: str = "none"
    transport: str = "torch"       # torch.distributed, or "mpi" through mpi4py (under mpirun)
    bucket_cap_mb: float = 25.0
    start_step: int = 0            # exchange uncompressed fp32 for the first steps (torch's start_powerSGD_iter)
    error_feedback: bool = True    # for the compressors that have it
    rank: int = 4                  # powersgd: rank of the P Q^T approximation
    powersgd_complex: str = "complex"     # powersgd on complex weights: complex P/Q, or a "real_view" matrix
    min_compression_rate: float = 2.0     # powersgd: compress a matrix only if n*m >= rate * r*(n+m)
    density: float = 0.01          # topk/randk: k = ceil(density * n)
    randk_unbiased: bool = False   # randk: scale by d/k (unbiased, no error feedback) instead of EF21
    block_size: int = 256          # int8/int4: elements per absmax scale
    auto_candidates: list = field(default_factory=lambda: ["none", "fp16", "powersgd", "int8", "int4", "sign", "topk"])

    def __post_init__(self):
        from trainer.compress import COMPRESSORS   # the registry lives next to the compressors
        _choice("comm.compressor", self.compressor, tuple(COMPRESSORS))
        _choice("comm.transport", self.transport, ("torch", "mpi"))
        _choice("comm.powersgd_complex", self.powersgd_complex, ("real_view", "complex"))
        _positive("comm.bucket_cap_mb", self.bucket_cap_mb)
        _positive("comm.start_step", self.start_step, zero_ok=True)
        _positive("comm.rank", self.rank)
        _positive("comm.min_compression_rate", self.min_compression_rate)
        if not 0 < self.density <= 1:
            raise ValueError(f"config key 'comm.density' = {self.density!r}; must be in (0, 1]")
        _positive("comm.block_size", self.block_size)
        from trainer.compress.auto import CANDIDATES
        if not isinstance(self.auto_candidates, list) or not self.auto_candidates:
            raise ValueError(f"config key 'comm.auto_candidates' = {self.auto_candidates!r}; give a non-empty list, "
                             f"e.g. {list(CANDIDATES[:3])}")
        for name in self.auto_candidates:   # auto predicts each one's time: only compressors with a cost model
            _choice("comm.auto_candidates[]", name, CANDIDATES)


@dataclass
class DistConfig:
    backend: str = "auto"          # gloo on CPU, nccl with CUDA
    timeout_s: int = 300           # rendezvous and collective timeout

    def __post_init__(self):
        _choice("dist.backend", self.backend, ("auto", "gloo", "nccl", "mpi"))
        _positive("dist.timeout_s", self.timeout_s)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self, redact: bool = True) -> dict:
        """The config as plain data; credentials in storage options are replaced by "<redacted>", so a run
        directory, log or checkpoint never holds them."""
        d = dataclasses.asdict(self)
        if redact:
            d["data"]["storage_options"] = redact_secrets(d["data"]["storage_options"])
        return d

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session", "auth")


def redact_secrets(options: Any) -> Any:
    """Copy of fsspec storage options with every credential-like value replaced (keys matched by name)."""
    if isinstance(options, dict):
        return {k: "<redacted>" if any(w in str(k).lower() for w in _SECRET_WORDS) and not isinstance(v, dict)
                else redact_secrets(v) for k, v in options.items()}
    if isinstance(options, list):
        return [redact_secrets(v) for v in options]
    return options


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check one TOML value against the dataclass field's annotation (ints widen to floats)."""
    typ = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}.get(typ, typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (str, int, float, bool, list, dict):
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"config key {key!r} = {value!r} is a {type(value).__name__}; expected {typ.__name__}")
    return value


def config_from_dict(raw: dict) -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ValueError(f"unknown config section {name!r}; allowed: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"config section {name!r} must be a table, got {values!r}")
        cls = hints[name]
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in fields:
                raise ValueError(f"unknown config key '{name}.{key}'; allowed: {', '.join(fields)}")
            values[key] = _coerce(f"{name}.{key}", value, fields[key])
        built[name] = cls(**values)
    return Config(**built)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string: --set data.path=runs/x.zarr
    return key.strip().split("."), parsed


def load_config(path: str | Path | None = None, overrides: list[str] = (), text: str | None = None) -> Config:
    """The config from a TOML file (or its `text`, as a launcher ships it to remote workers) plus overrides."""
    raw: dict = {}
    if path is not None and text is None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
    if text is not None:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    for text in overrides:
        keys, value = _parse_override(text)
        if len(keys) != 2:
            raise ValueError(f"override {text!r}: keys are section.key, e.g. optim.lr=1e-3")
        raw.setdefault(keys[0], {})[keys[1]] = value
    return config_from_dict(raw)


# ---- resuming under a changed config ------------------------------------------------------------------------------
# What may differ between a checkpoint's config and the config that resumes it. A key not listed under its section
# takes the section's rule ("*"). "refuse": the checkpoint cannot load into it, or the run would silently become
# another run (a new data order); "reset": allowed, the compressor state starts afresh; "batch": allowed, handled as
# an elastic change (learning rate rescaled with the global batch); "allow": takes effect from the resumed step on.
RESUME_RULES = {
    "run": {"*": "allow", "seed": "refuse"},        # run.name and run.out_dir name the run directory itself
    "data": {"*": "allow", "test_fraction": "refuse", "shuffle": "refuse", "drop_last": "refuse",
             "window_chunks": "refuse", "batch_size": "batch"},  # data.path: a copy of the same dataset (checked)
    "model": {"*": "refuse"},
    "optim": {"*": "allow", "name": "refuse"},
    "train": {"*": "allow"},
    "comm": {"*": "reset", "transport": "allow", "start_step": "allow", "auto_candidates": "allow"},
    "dist": {"*": "allow"},
}
RESUME_WHY = {"refuse": "cannot change on resume", "reset": "compressor state starts afresh",
              "batch": "elastic change: learning rate follows the global batch", "allow": "takes effect on resume"}


def resume_changes(saved: dict, new: dict) -> dict[str, list[tuple[str, Any, Any]]]:
    """Keys whose values differ between a checkpoint's config (`saved`, as `Config.to_dict()`) and `new`, grouped by
    rule: {"refuse": [(key, saved_value, new_value), ...], "reset": [...], "batch": [...], "allow": [...]}."""
    out: dict[str, list] = {rule: [] for rule in RESUME_WHY}
    for section, rules in RESUME_RULES.items():
        old_s, new_s = saved.get(section, {}), new.get(section, {})
        for key in sorted(set(old_s) | set(new_s)):
            if section == "run" and key in ("name", "out_dir"):
                continue
            if key not in old_s:   # a key this version added: its default was in force
                continue
            if old_s.get(key) != new_s.get(key):
                out[rules.get(key, rules["*"])].append((f"{section}.{key}", old_s.get(key), new_s.get(key)))
    return out

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
    threads_per_rank: int = 0      # 0: OMP_NUM_THREADS if set, else cores // local ranks

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
    """`[model] name = "fno"` and the named model's own table, `[model.fno]`, typed by its registry entry
    (`ModelSpec.config`). Tables of other registered models may be present (a file switched by --set model.name);
    each is validated. `cfg.model.fno` is the table; `cfg.model.params` the selected model's."""
    name: str = "fno"
    sections: dict = field(default_factory=dict)   # model name -> its config dataclass

    def __post_init__(self):
        from trainer.registry import get_model_spec   # the registry lives next to the models
        get_model_spec(self.name)
        for name, values in list(self.sections.items()):
            spec = get_model_spec(name)
            if isinstance(values, dict):
                self.sections[name] = _build_section(spec.config, values, f"model.{name}")
        if self.name not in self.sections:
            self.sections[self.name] = get_model_spec(self.name).config()
        backbone = getattr(self.params, "backbone", None)   # a model built over another (EDM over an operator)
        if backbone is not None:
            if backbone not in self.sections:
                self.sections[backbone] = get_model_spec(backbone).config()
            self.params.backbone_config = self.sections[backbone]   # not a field: saved once, as [model.<backbone>]

    @property
    def params(self) -> Any:
        return self.sections[self.name]

    def __getattr__(self, item: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if item in sections:
            return sections[item]
        raise AttributeError(f"model config has no table {item!r} (model.name = {self.__dict__.get('name')!r})")

    def to_dict(self) -> dict:
        return {"name": self.name, **{n: dataclasses.asdict(c) for n, c in sorted(self.sections.items())}}


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9          # sgd only
    scheduler: str = "cosine"      # per step over the whole run; "step": lr * gamma^(steps after warm-up // step_size)
    warmup_steps: int = 0
    step_size: int = 1000          # "step" only
    gamma: float = 0.1             # "step" only
    grad_clip: float = 0.0         # 0: off

    def __post_init__(self):
        _choice("optim.name", self.name, ("adam", "adamw", "sgd"))
        _choice("optim.scheduler", self.scheduler, ("cosine", "constant", "step"))
        _positive("optim.step_size", self.step_size)
        if not 0 < self.gamma <= 1:
            raise ValueError(f"config key 'optim.gamma' = {self.gamma!r}; must be in (0, 1]")
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
class EMAConfig:
    """[ema]: an exponential moving average of the weights (trainer/ema.py), used for evaluation and sampling."""
    kind: str = "none"             # "power" (EDM2), "halflife" (EDM) or "none"
    std: float = 0.10              # power: EDM2's sigma_rel, the profile's width relative to the run
    halflife_steps: float = 500.0  # halflife: steps for the average's weight on a step to halve
    rampup_ratio: float = 0.05     # halflife: the half-life is at most this fraction of the steps so far (0: none)

    def __post_init__(self):
        _choice("ema.kind", self.kind, ("none", "power", "halflife"))
        if not 0 < self.std < 0.2887:   # sigma_rel -> 1/sqrt(12) as gamma -> -1 (a uniform average)
            raise ValueError(f"config key 'ema.std' = {self.std!r}; must be in (0, 0.2887) (EDM2 uses 0.05-0.15)")
        _positive("ema.halflife_steps", self.halflife_steps)
        _positive("ema.rampup_ratio", self.rampup_ratio, zero_ok=True)


@dataclass
class PowerSGDOptions:
    """[comm.powersgd] (Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient Compression")."""
    rank: int = 4                  # rank r of the P Q^T approximation
    complex: str = "complex"       # complex weights: complex P/Q, or a "real_view" float matrix
    min_compression_rate: float = 2.0     # compress a matrix only if n*m >= rate * r*(n+m)
    q_wire: str = "float32"        # Q's dtype on the wire: "bfloat16" halves the bytes (the rounding goes to e)
    view: str = "first"            # a tensor's matrix: "first" dim x the rest (torch's hook), or the "balanced"
                                   # split of its axes with the fewest floats per rank (powersgd.matrix_axes)
    p_wire: str = "float32"        # P's dtype on the wire: "bfloat16" halves P's bytes (P is orthonormalised after
                                   # the sum, so the rounding only tilts the subspace; e keeps what it loses)
    compute: str = "float32"       # the three products' inputs: "bfloat16" (float32 accumulation, bfloat16 results;
                                   # e keeps the rounding) runs 4x faster on CPUs with AVX512-BF16 and on GPUs

    def __post_init__(self):
        _positive("comm.powersgd.rank", self.rank)
        _choice("comm.powersgd.complex", self.complex, ("real_view", "complex"))
        _positive("comm.powersgd.min_compression_rate", self.min_compression_rate)
        _choice("comm.powersgd.q_wire", self.q_wire, ("float32", "bfloat16"))
        _choice("comm.powersgd.p_wire", self.p_wire, ("float32", "bfloat16"))
        _choice("comm.powersgd.compute", self.compute, ("float32", "bfloat16"))
        _choice("comm.powersgd.view", self.view, ("first", "balanced"))


@dataclass
class TopKOptions:
    """[comm.topk]: keep the k = ceil(density * n) largest entries (with error feedback)."""
    density: float = 0.01

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise ValueError(f"config key 'comm.topk.density' = {self.density!r}; must be in (0, 1]")


@dataclass
class RandKOptions:
    """[comm.randk]: k = ceil(density * n) random entries, EF21 (or unbiased d/k scaling, no error feedback)."""
    density: float = 0.01
    unbiased: bool = False

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise ValueError(f"config key 'comm.randk.density' = {self.density!r}; must be in (0, 1]")


@dataclass
class QuantOptions:
    """[comm.int8], [comm.int4]: blockwise absmax quantisation."""
    block_size: int = 256          # elements per absmax scale

    def __post_init__(self):
        _positive("comm.int8/int4.block_size", self.block_size)


@dataclass
class CommConfig:
    """The gradient exchange and its compressor; each compressor's settings are its own table ([comm.powersgd])."""
    compressor: str = "none"
    transport: str = "torch"       # torch.distributed, or "mpi" through mpi4py (under mpirun)
    start_step: int = 0            # exchange uncompressed fp32 for the first steps (torch's start_powerSGD_iter)
    error_feedback: bool = True    # for the compressors that have it
    ef_state: str = "full"         # sharded engines: the error-feedback residual's form (see README, "Error feedback")
    hierarchy: str = "none"        # "node": fp32 reduce inside a node, the compressor between nodes (ddp)
    auto_candidates: list = field(default_factory=lambda: ["none", "fp16", "powersgd", "int8", "int4", "sign", "topk"])
    auto_every: int = 0            # auto under ddp: re-measure the link and re-decide every N steps (0: once)
    auto_trials: int = 2           # auto under ddp: timed exchanges per shortlisted candidate (0: the cost model alone)
    auto_trial_steps: int = 0      # auto under ddp: training steps each shortlisted candidate runs before the choice
                                   # is final (0, off: the timed exchanges decide; else >= 2, the first is not timed)
    powersgd: PowerSGDOptions = field(default_factory=PowerSGDOptions)
    topk: TopKOptions = field(default_factory=TopKOptions)
    randk: RandKOptions = field(default_factory=RandKOptions)
    int8: QuantOptions = field(default_factory=QuantOptions)
    int4: QuantOptions = field(default_factory=QuantOptions)

    def __post_init__(self):
        from trainer.compress import COMPRESSORS   # the registry lives next to the compressors
        _choice("comm.compressor", self.compressor, tuple(COMPRESSORS))
        _choice("comm.transport", self.transport, ("torch", "mpi"))
        _choice("comm.ef_state", self.ef_state, EF_STATES)
        _choice("comm.hierarchy", self.hierarchy, ("none", "node"))
        if self.hierarchy != "none" and self.transport != "torch":
            raise ValueError(f"config key 'comm.hierarchy' = {self.hierarchy!r} runs over torch.distributed process "
                             f"groups; with comm.transport = {self.transport!r} use comm.hierarchy = 'none'")
        _positive("comm.start_step", self.start_step, zero_ok=True)
        _positive("comm.auto_every", self.auto_every, zero_ok=True)
        _positive("comm.auto_trials", self.auto_trials, zero_ok=True)
        if self.auto_trial_steps == 1 or self.auto_trial_steps < 0:
            raise ValueError(f"config key 'comm.auto_trial_steps' = {self.auto_trial_steps!r}: 0 (off) or >= 2 "
                             "(each candidate's first step is not timed)")
        if self.int4.block_size % 2:
            raise ValueError(f"config key 'comm.int4.block_size' = {self.int4.block_size!r}; must be even (a block's "
                             f"two halves share its bytes)")
        from trainer.compress.auto import candidates
        if not isinstance(self.auto_candidates, list) or not self.auto_candidates:
            raise ValueError(f"config key 'comm.auto_candidates' = {self.auto_candidates!r}; give a non-empty list, "
                             f"e.g. {list(candidates()[:3])}")
        for name in self.auto_candidates:   # auto predicts each one's time: only compressors with a cost model
            _choice("comm.auto_candidates[]", name, candidates())

    def options(self, compressor: str | None = None) -> Any:
        """The table of `compressor` (default: the configured one), or None for those without settings."""
        return getattr(self, compressor or self.compressor, None) if (compressor or self.compressor) in \
            ("powersgd", "topk", "randk", "int8", "int4") else None


EF_STATES = ("full", "bf16", "sharded")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ParallelConfig:
    """How the model is spread over ranks: `engine` and that engine's keys."""
    engine: str = "ddp"            # ddp | fsdp2 | deepspeed (trainer/parallel/)
    zero_stage: int = 1            # deepspeed: ZeRO stage 1, 2 or 3
    param_dtype: str = "float32"   # fsdp2/deepspeed: compute dtype of forward/backward (mixed precision)
    reduce_dtype: str = "float32"  # fsdp2/deepspeed: dtype gradients are cast to before the exchange; the wire
                                   # format is comm.compressor's ("bf16"/"fp16" for 16-bit reduction)
    reshard_after_forward: bool = True    # fsdp2: free gathered parameters after forward (ZeRO-3-like) or keep them
    bucket_cap_mb: float = 25.0    # ddp gradient buckets (0: chosen so the exchange overlaps backward, from the
                                   # model, the measured link and the exchange thread's cost beside backward);
                                   # deepspeed reduce bucket size

    def __post_init__(self):
        from trainer.parallel import ENGINES
        _choice("parallel.engine", self.engine, tuple(ENGINES))
        _choice("parallel.zero_stage", self.zero_stage, (1, 2, 3))
        _choice("parallel.param_dtype", self.param_dtype, DTYPES)
        _choice("parallel.reduce_dtype", self.reduce_dtype, DTYPES)
        _positive("parallel.bucket_cap_mb", self.bucket_cap_mb, zero_ok=self.engine == "ddp")


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
    ema: EMAConfig = field(default_factory=EMAConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self):
        from trainer.parallel import ENGINES   # what an engine cannot carry, before any process group or file
        ENGINES[self.parallel.engine].check(self)

    def to_dict(self, redact: bool = True) -> dict:
        """The config as plain data; credentials in storage options are replaced by "<redacted>", so a run
        directory, log or checkpoint never holds them."""
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
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


# Keys of the flat layout (before [model.fno], [parallel] and the per-compressor tables) and where they live now.
MOVED = {**{f"model.{k}": f"model.fno.{k}" for k in ("width", "modes", "n_layers", "padding", "projection_channels",
                                                      "spectral_weights")},
         "comm.rank": "comm.powersgd.rank", "comm.powersgd_complex": "comm.powersgd.complex",
         "comm.min_compression_rate": "comm.powersgd.min_compression_rate",
         "comm.density": "comm.topk.density (or comm.randk.density)", "comm.randk_unbiased": "comm.randk.unbiased",
         "comm.block_size": "comm.int8.block_size (or comm.int4.block_size)",
         "comm.bucket_cap_mb": "parallel.bucket_cap_mb"}


def _build_section(cls: type, values: Any, prefix: str) -> Any:
    """One dataclass from a TOML table, recursing into fields that are dataclasses themselves."""
    if not isinstance(values, dict):
        raise ValueError(f"config section {prefix!r} must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}.{key}"
        if key not in fields:
            if name in MOVED:
                raise ValueError(f"config key {name!r} moved to {MOVED[name]!r}")
            raise ValueError(f"unknown config key {name!r}; allowed: {', '.join(sorted(fields))}")
        typ = hints[key]
        kwargs[key] = (_build_section(typ, value, name) if dataclasses.is_dataclass(typ)
                       else _coerce(name, value, typ))
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    sections = {f.name for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ValueError(f"unknown config section {name!r}; allowed: {', '.join(sections)}")
        if name == "model":
            if not isinstance(values, dict):
                raise ValueError(f"config section 'model' must be a table, got {values!r}")
            values = dict(values)
            for key in [k for k, v in values.items() if k != "name" and not isinstance(v, dict)]:
                if f"model.{key}" in MOVED:
                    raise ValueError(f"config key 'model.{key}' moved to {MOVED['model.' + key]!r}")
                raise ValueError(f"unknown config key 'model.{key}'; allowed: name, and a table per model "
                                 f"([model.<name>])")
            name_value = _coerce("model.name", values.pop("name", "fno"), str)
            built[name] = ModelConfig(name=name_value, sections=values)
        else:
            built[name] = _build_section(hints[name], values, name)
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
    """The config from a TOML file (or its `text`, as a launcher ships it to remote workers) plus overrides at any
    depth (`parallel.zero_stage=3`, `model.fno.width=16`, `comm.powersgd.rank=2`)."""
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
        if len(keys) < 2 or not all(keys):
            raise ValueError(f"override {text!r}: keys are section.key (or deeper), e.g. optim.lr=1e-3")
        table = raw
        for i, k in enumerate(keys[:-1]):
            table = table.setdefault(k, {})
            if not isinstance(table, dict):
                raise ValueError(f"override {text!r}: {'.'.join(keys[:i + 1])!r} is a value, not a table")
        table[keys[-1]] = value
    return config_from_dict(raw)


# ---- resuming under a changed config ------------------------------------------------------------------------------
# What may differ between a checkpoint's config and the config that resumes it. A key not listed under its section
# takes the section's rule ("*"). "refuse": the checkpoint cannot load into it, or the run would silently become
# another run (a new data order); "reset": allowed, the compressor state starts afresh; "batch": allowed, handled as
# an elastic change (learning rate rescaled with the global batch); "allow": takes effect from the resumed step on.
RESUME_RULES = {
    "run": {"*": "allow", "seed": "refuse"},
    # Engines load each other's checkpoints (DCP reshards parameters and optimizer state); compressor state is kept
    # per parameter by DDP and per reduce-scatter shard by sharded engines, so an engine change starts it afresh.
    "parallel": {"*": "allow", "engine": "reset", "zero_stage": "reset"},        # run.name and run.out_dir name the run directory itself
    "data": {"*": "allow", "test_fraction": "refuse", "shuffle": "refuse", "drop_last": "refuse",
             "window_chunks": "refuse", "batch_size": "batch"},  # data.path: a copy of the same dataset (checked)
    "model": {"*": "refuse"},
    "optim": {"*": "allow", "name": "refuse"},
    "train": {"*": "allow"},
    "ema": {"*": "allow", "kind": "refuse"},   # the average so far is of one kind; its settings shape what follows
    "comm": {"*": "reset", "transport": "allow", "start_step": "allow", "auto_candidates": "allow",
             "auto_every": "allow", "auto_trials": "allow", "auto_trial_steps": "allow"},
    "dist": {"*": "allow"},
}
RESUME_WHY = {"refuse": "cannot change on resume", "reset": "compressor state starts afresh",
              "batch": "elastic change: learning rate follows the global batch", "allow": "takes effect on resume"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "storage_options":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def migrate_config_dict(saved: dict) -> dict:
    """A saved config (`Config.to_dict()` of an older version) in today's layout: flat model/comm keys moved to
    their tables (MOVED), so resume compares like with like."""
    saved = {s: dict(v) if isinstance(v, dict) else v for s, v in saved.items()}
    model = saved.get("model", {})
    if model and not any(isinstance(v, dict) for v in model.values()):
        name = model.get("name", "fno")
        saved["model"] = {"name": name, name: {k: v for k, v in model.items() if k != "name"}}
    comm = saved.get("comm", {})
    table_of = {"rank": ("powersgd", "rank"), "powersgd_complex": ("powersgd", "complex"),
                "min_compression_rate": ("powersgd", "min_compression_rate"), "randk_unbiased": ("randk", "unbiased"),
                "density": ("topk", "density"), "block_size": ("int8", "block_size")}
    for old, (table, key) in table_of.items():
        if old in comm:
            value = comm.pop(old)
            comm.setdefault(table, {})[key] = value
            if old == "density":
                comm.setdefault("randk", {})["density"] = value
            if old == "block_size":
                comm.setdefault("int4", {})["block_size"] = value
    if "bucket_cap_mb" in comm:
        saved.setdefault("parallel", {})["bucket_cap_mb"] = comm.pop("bucket_cap_mb")
    fno = saved.get("model", {}).get("fno")
    if isinstance(fno, dict) and "fast_padding" not in fno:   # before it, padding was exact
        saved["model"]["fno"] = {**fno, "fast_padding": False}
    return saved


def resume_changes(saved: dict, new: dict) -> dict[str, list[tuple[str, Any, Any]]]:
    """Keys whose values differ between a checkpoint's config (`saved`, as `Config.to_dict()`, any version) and
    `new`, grouped by rule: {"refuse": [(key, saved_value, new_value), ...], "reset": [...], "batch": [...],
    "allow": [...]}. Nested tables compare key by key (`model.fno.width`) under their section's rules."""
    saved = migrate_config_dict(saved)
    out: dict[str, list] = {rule: [] for rule in RESUME_WHY}
    for section, rules in RESUME_RULES.items():
        old_s, new_s = _flatten(saved.get(section, {})), _flatten(new.get(section, {}))
        for key in sorted(set(old_s) | set(new_s)):
            if section == "run" and key in ("name", "out_dir"):
                continue
            if key not in old_s:   # a key this version added: its default was in force
                continue
            if old_s.get(key) != new_s.get(key):
                rule = rules.get(key, rules["*"])
                table = key.split(".")[0]
                if section == "comm" and "." in key and table != new.get("comm", {}).get("compressor"):
                    rule = "allow"   # another compressor's table: no effect on this run's state
                out[rule].append((f"{section}.{key}", old_s.get(key), new_s.get(key)))
    return out

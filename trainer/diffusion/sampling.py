"""Sampling a trained EDM model: load it from a run or checkpoint, draw ensembles, and the chunk jobs that
`fieldtrain sample` fans out over ranks or Ray tasks (launch/sample.py writes their chunks into a Zarr store).

    model, meta = load_edm("runs/darcy_edm")                       # the EMA weights when the run kept an average
    ens = sample_ensemble(model, cond, members=8, sampler="dpmpp_2m", sigmas=sigmas, seeds=[0, 1, 2])

Everything here works in the model's space (targets and conditions standardised with the training store's
statistics); `SampleJob` decodes to physical units before it writes.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data.loader import ChannelNormalizer
from trainer.compress.base import mixed_seed
from trainer.diffusion.edm import EDMPrecond
from trainer.diffusion.samplers import get_sampler, nfe
from trainer.diffusion.schedules import get_sigmas
from trainer.registry import DataSpec, get_model_spec


# ---- loading a trained model ---------------------------------------------------------------------------------------
def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    from trainer.checkpoint import CheckpointManager
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    if (path / "checkpoints").is_dir():
        latest = CheckpointManager(path / "checkpoints").latest()
        if latest is not None:
            return latest
        raise ValueError(f"{path}: run directory has no finished checkpoint under checkpoints/")
    raise ValueError(f"{path}: neither a checkpoint (no .metadata) nor a run directory (no checkpoints/)")


def load_edm(path: str | Path, weights: str = "ema") -> tuple[EDMPrecond, dict]:
    """The EDM model a run trained, in eval mode on the CPU, and its run_meta (config, dataset identity).
    weights: "ema" (the average, when the run kept one; else the trained weights, with meta["weights"] saying
    which) or "raw". Any engine's checkpoint loads: DCP gathers sharded entries into whole tensors here."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from trainer.config import config_from_dict, migrate_config_dict
    from trainer.train import read_run_meta
    if weights not in ("ema", "raw"):
        raise ValueError(f"'weights' = {weights!r}; allowed: 'ema', 'raw'")
    ckpt = find_checkpoint(path)
    meta = read_run_meta(ckpt)
    if meta is None:
        raise ValueError(f"{ckpt}: checkpoint has no run record (written before run_meta existed); cannot rebuild "
                         "the model")
    cfg = config_from_dict(migrate_config_dict(meta["config"]))
    if cfg.model.name != "edm":
        raise ValueError(f"{ckpt}: model.name = {cfg.model.name!r}; sampling needs a diffusion model ('edm')")
    ident = meta["dataset"]
    norm = ident["normalization"]
    data = DataSpec(tuple(ident["input_shape"]), tuple(ident["target_shape"]),
                    ChannelNormalizer.from_stats(norm["targets"]))
    model = get_model_spec("edm").build(cfg.model.params, data)
    # one file with every entry gathered whole (the models sampled here are small next to their optimizer), in a
    # private temporary directory: ranks and Ray workers load the same checkpoint at once, and it may be read-only
    with tempfile.TemporaryDirectory(prefix="fieldtrain-load-") as tmp:
        dcp_to_torch_save(ckpt, Path(tmp) / "flat.pt")
        state = torch.load(Path(tmp) / "flat.pt", weights_only=False)
    source, used = _weights(state, weights)
    _load_params(model, source, ckpt)
    model.eval()
    meta = {**meta, "weights": used, "checkpoint": str(ckpt), "step": int(state["trainer"]["step"]),
            "input_norm": norm["inputs"], "target_norm": norm["targets"], "data_spec": data}
    return model, meta


def _weights(state: dict, weights: str) -> tuple[dict, str]:
    ema = state.get("ema", {}).get("weights")
    if weights == "ema" and ema:
        return ema, "ema"
    mo = state["model_optim"]
    return (mo.get("model") or mo.get("zero3_model")), "raw"


def _load_params(model: nn.Module, source: dict, ckpt: Path) -> None:
    """Copy by name; entries may be flat (ZeRO-3 partitions gathered) or real views of complex parameters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in source:
                raise ValueError(f"{ckpt}: checkpoint has no weights for parameter {name!r}")
            t = source[name]
            if p.is_complex() and not t.is_complex():
                t = torch.view_as_complex(t.float().reshape(*p.shape, 2).contiguous())
            p.copy_(t.reshape(p.shape))


# ---- sampling ------------------------------------------------------------------------------------------------------
def sigmas_for(model: EDMPrecond, schedule: str, steps: int, sigmas: list | None = None) -> torch.Tensor:
    cfg = model.cfg
    return get_sigmas(schedule, steps, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigmas=sigmas,
                      c=model.sigma_data).to(torch.float32)


@torch.no_grad()
def sample_ensemble(model: nn.Module, cond: torch.Tensor | None, members: int, sampler: str, sigmas: torch.Tensor,
                    seeds: list[int], target_shape: tuple[int, ...], guidance=None) -> torch.Tensor:
    """(B, members, *target_shape) samples, member m of row b started from noise seeded by seeds[b] (so a row's
    ensemble does not depend on which rows share its batch, for deterministic samplers). cond: (B, C_in, *grid)
    or None (then B = len(seeds)). guidance(denoiser, x, sigmas, generator) replaces the sampler (DPS)."""
    B = len(seeds)
    x = torch.stack([torch.randn(members, *target_shape, generator=torch.Generator().manual_seed(s))
                     for s in seeds]).flatten(0, 1).to(sigmas.device) * sigmas[0]
    c = None if cond is None else cond.repeat_interleave(members, dim=0)
    denoiser = lambda x_, sigma: model(x_, sigma.to(x_.dtype).expand(len(x_)), c)   # noqa: E731
    g = torch.Generator().manual_seed(mixed_seed(*seeds))
    if guidance is not None:
        with torch.enable_grad():
            out = guidance(denoiser, x, sigmas, g)
    else:
        out = get_sampler(sampler)(denoiser, x, sigmas, generator=g)
    return out.reshape(B, members, *target_shape)


# ---- chunk jobs for `fieldtrain sample` (launch/sample.py) -------------------------------------------------------
@dataclass
class SampleJob:
    """Rows of a sample store: row r is an ensemble of `members` samples for condition r of `cond_url` (and the
    truth, when that store has targets), or, unconditional, one sample. Seeded by (seed, row): the store does not
    depend on how many workers wrote it. `observe_fraction` > 0: DPS posterior sampling given the truth observed
    at that fraction of grid points (the same points for every row, drawn from `seed`)."""
    checkpoint: str
    num_rows: int
    chunk_size: int
    members: int
    sampler: str = "dpmpp_2m"
    schedule: str = "edm"
    sigma_list: list | None = None   # schedule "list": the user's decreasing sigmas (steps = len - 1)
    steps: int = 10
    seed: int = 0
    cond_url: str | None = None
    cond_start: int = 0
    storage_options: dict = field(default_factory=dict)
    weights: str = "ema"
    rollout: int = 0              # trajectory models: steps rolled out from state `rollout_from` (0: to the end)
    rollout_from: int = 0
    observe_fraction: float = 0.0
    zeta: float = 1.0
    noise_std: float = 0.0        # assumed observation noise (only reported; DPS's step does not use it)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        model, meta = self._loaded()
        self.target_shape = tuple(meta["dataset"]["target_shape"])
        self.conditional = model.cond_channels > 0
        self.trajectory = model.cfg.pairs == "trajectory"
        if self.conditional and self.cond_url is None:
            raise ValueError(f"{self.checkpoint}: the model is conditional ({model.cond_channels} input channels): "
                             "give --cond URL, a store whose inputs are the conditions")
        if self.observe_fraction and self.cond_url is None:
            raise ValueError("--observe needs --cond URL: a store whose targets are the fields to observe")
        self.sample_shape = (self.members, *self.target_shape) if self.cond_url else self.target_shape
        self.extra_arrays = {"truth": self.target_shape} if self.cond_url else {}
        if self.trajectory:   # row: `members` rollouts of K states, (members, K, 1, *grid); truth (K, 1, *grid)
            T = self.target_shape[0]
            if not 0 <= self.rollout_from < T - 1:
                raise ValueError(f"--rollout-from = {self.rollout_from}; the trajectories hold states 0..{T - 1}, "
                                 f"a rollout starts at one of 0..{T - 2}")
            self.rollout = self.rollout or T - 1 - self.rollout_from
            if not 1 <= self.rollout <= T - 1 - self.rollout_from:
                raise ValueError(f"--rollout = {self.rollout}; from state {self.rollout_from} the store holds the "
                                 f"truth for at most {T - 1 - self.rollout_from} steps")
            if self.observe_fraction:
                raise ValueError("--observe is for field models (pairs = 'fields'), not trajectory rollouts")
            state = (1, *self.target_shape[1:])
            self.sample_shape = (self.members, self.rollout, *state)
            self.extra_arrays = {"truth": (self.rollout, *state)}
        if self.cond_url:
            available = conditions_available(self)
            if self.num_rows > available:
                raise ValueError(f"--cond {self.cond_url}: {self.num_rows} conditions asked from index "
                                 f"{self.cond_start}, the store has {available} there")
        self.sigmas = sigmas_for(model, self.schedule, self.steps, self.sigma_list)   # validates them
        get_sampler(self.sampler)
        self.meta = {"checkpoint": meta["checkpoint"], "step": meta["step"], "weights": meta["weights"],
                     "sampler": self.sampler, "schedule": self.schedule, "steps": self.steps,
                     "nfe": nfe(self.sampler, self.sigmas), "sigmas": [float(s) for s in self.sigmas],
                     "seed": self.seed, "members": self.members, "cond_url": self.cond_url,
                     "cond_start": self.cond_start, "observe_fraction": self.observe_fraction,
                     "zeta": self.zeta if self.observe_fraction else None, "target_norm": meta["target_norm"],
                     "rollout": self.rollout if self.trajectory else None,
                     "rollout_from": self.rollout_from if self.trajectory else None}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state):
        self.__dict__.update(state, _cache={})

    def _loaded(self):
        if "model" not in self._cache:
            self._cache["model"] = load_edm(self.checkpoint, self.weights)
        return self._cache["model"]

    def _cond_store(self):
        if "cond" not in self._cache:
            from data.store import FieldDataset
            ds = FieldDataset(self.cond_url, self.storage_options)
            model, meta = self._loaded()
            _check_cond_store(ds, meta, model)
            self._cache["cond"] = ds
        return self._cache["cond"]

    def __call__(self, chunk: int, start: int, stop: int) -> dict[str, np.ndarray]:
        model, meta = self._loaded()
        tnorm = ChannelNormalizer.from_stats(meta["target_norm"])
        seeds = [mixed_seed(self.seed, row) for row in range(start, stop)]
        if self.cond_url is None:
            ens = sample_ensemble(model, None, 1, self.sampler, self.sigmas, seeds, self.target_shape)[:, 0]
            return {"samples": tnorm.decode(ens).numpy()}
        ds = self._cond_store()
        x, y = ds.read(self.cond_start + start, self.cond_start + stop)
        if self.trajectory:
            return self._rollout(model, meta, y, start)
        inorm = ChannelNormalizer.from_stats(meta["input_norm"])
        cond = inorm.encode(torch.from_numpy(x)) if self.conditional else None
        truth = torch.from_numpy(y)
        guidance = None
        if self.observe_fraction:
            guidance = self._dps(tnorm.encode(truth), ds)
        ens = sample_ensemble(model, cond, self.members, self.sampler, self.sigmas, seeds, self.target_shape,
                              guidance=guidance)
        samples = tnorm.decode(ens.flatten(0, 1)).reshape(ens.shape)
        return {"samples": samples.numpy(), "truth": y.astype(np.float32)}

    def _rollout(self, model, meta, traj: np.ndarray, start: int) -> dict[str, np.ndarray]:
        """Autoregressive ensembles: member m of row r steps from the stored state `rollout_from`, each step a sample
        of w_{k+1} given its own previous sample (seeded by (seed, row, member, step))."""
        from trainer.diffusion.edm import trajectory_stats
        mean, std = trajectory_stats(meta["data_spec"])
        rows, M, K = len(traj), self.members, self.rollout
        state = ((torch.from_numpy(traj[:, self.rollout_from]) - mean) / std)[:, None]   # (rows, 1, *grid)
        state = state.repeat_interleave(M, dim=0)
        out = []
        for j in range(K):
            seeds = [mixed_seed(self.seed, start + r, m, j) for r in range(rows) for m in range(M)]
            state = sample_ensemble(model, state, 1, self.sampler, self.sigmas, seeds, tuple(state.shape[1:]))[:, 0]
            out.append(state)
        samples = torch.stack(out, dim=1).reshape(rows, M, K, *state.shape[1:]) * std + mean
        truth = traj[:, self.rollout_from + 1:self.rollout_from + 1 + K, None]
        return {"samples": samples.numpy().astype(np.float32), "truth": truth.astype(np.float32)}

    def _dps(self, truth_normed: torch.Tensor, ds):
        from trainer.diffusion.inverse import dps_sample, random_points
        obs = random_points(self.target_shape, self.observe_fraction, torch.Generator().manual_seed(self.seed))
        y = obs.observe(truth_normed).repeat_interleave(self.members, dim=0)
        return lambda denoiser, x, sigmas, g: dps_sample(denoiser, x, sigmas, obs, y, self.zeta, generator=g)


def _check_cond_store(ds, meta: dict, model: EDMPrecond) -> None:
    want_in, want_out = tuple(meta["dataset"]["input_shape"]), tuple(meta["dataset"]["target_shape"])
    if ds.input_shape[1:] != want_in[1:] or ds.target_shape[1:] != want_out[1:]:
        raise ValueError(f"--cond {ds.url}: grid {ds.input_shape[1:]} differs from the model's {want_in[1:]}")
    if model.cond_channels and ds.input_shape[0] != want_in[0]:
        raise ValueError(f"--cond {ds.url}: array 'inputs' has {ds.input_shape[0]} channels, the model is "
                         f"conditioned on {want_in[0]}")
    if ds.target_shape[0] != want_out[0]:
        raise ValueError(f"--cond {ds.url}: array 'targets' has {ds.target_shape[0]} channels, the model "
                         f"generates {want_out[0]}")


def conditions_available(job: SampleJob) -> int:
    return job._cond_store().num_samples - job.cond_start


def evaluate_samples(url: str, report_dir: Path, storage_options: dict | None = None) -> dict:
    """Score a conditional sample store against the truth it holds: relative L2 of the ensemble mean, CRPS
    (fair), spread-skill ratio, energy-spectrum error; figures and eval.json into report_dir."""
    from data.samples import open_samples
    from trainer.diffusion.figures import plot_samples, plot_spectra
    from trainer.diffusion.metrics import (crps_ensemble, energy_spectrum, ensemble_mean_rel_l2, spectrum_error,
                                           spread_skill_ratio)
    store = open_samples(url, storage_options)
    ens = torch.from_numpy(store.read()).transpose(0, 1)      # (M, B, C, *grid), or (M, B, K, 1, *grid) rollouts
    truth = torch.from_numpy(store.read(name="truth"))
    steps = None
    if store.meta.get("rollout"):   # per rollout step, then the last step's ensemble scored like a field model's
        steps = [{"step": j + 1, "ens_mean_rel_l2": ensemble_mean_rel_l2(ens[:, :, j], truth[:, j]).mean().item(),
                  "crps": crps_ensemble(ens[:, :, j], truth[:, j], fair=ens.shape[0] > 1).mean().item()}
                 for j in range(truth.shape[1])]
        ens, truth = ens[:, :, -1], truth[:, -1]
    k, e_true = energy_spectrum(truth)
    _, e_ens = energy_spectrum(ens.flatten(0, 1))
    result = {"conditions": int(truth.shape[0]), "members": int(ens.shape[0]),
              "ens_mean_rel_l2": ensemble_mean_rel_l2(ens, truth).mean().item(),
              "crps": crps_ensemble(ens, truth, fair=ens.shape[0] > 1).mean().item(),
              "spread_skill": spread_skill_ratio(ens, truth).item() if ens.shape[0] > 1 else float("nan"),
              "spectrum_error": spectrum_error(ens, truth).item()}
    report_dir.mkdir(parents=True, exist_ok=True)
    result["figures"] = [
        str(plot_samples(report_dir / "samples.png", None, truth[0], ens[:, 0], title=f"{url}: row 0")),
        str(plot_spectra(report_dir / "spectra.png", k, {"truth": e_true.mean((0, 1)), "samples": e_ens.mean((0, 1))}))]
    if steps is not None:
        from trainer.diffusion.figures import plot_error_vs_nfe
        result["rollout"] = steps
        rows = [{"method": m, "nfe": r["step"], "error": r[key]} for r in steps
                for m, key in (("ensemble-mean rel. L2", "ens_mean_rel_l2"), ("CRPS", "crps"))]
        result["figures"].append(str(plot_error_vs_nfe(report_dir / "rollout.png", rows, title="rollout error by step",
                                                       xlabel="rollout step")))
    (report_dir / "eval.json").write_text(json.dumps({"url": url, **result}, indent=2))
    return result

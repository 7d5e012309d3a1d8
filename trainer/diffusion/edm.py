"""EDM: a diffusion model of fields over any registered operator (Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models"), registered as `model.name = "edm"`:

    [model]
    name = "edm"
    [model.edm]
    backbone = "fno"         # any registered operator with a `backbone` builder; its own table sets its size:
    [model.fno]
    width = 32

The network is trained as a denoiser D(x; sigma) ~ E[y | y + sigma n = x] of the store's targets y (standardised
per channel with the store's statistics, as the operator models see them); with `conditional = true` the store's
inputs are the conditioning fields (Darcy: pressure given the coefficient), given to the backbone as extra input
channels. The noise level reaches every layer through an embedding of c_noise (trainer/models/fno.py's FiLM).

`pairs = "trajectory"`: the targets are a trajectory, one channel per recorded time (Navier-Stokes vorticity,
Burgers), and the model learns the next state given the current one, w_{k+1} | w_k, from pairs at a random k per
sample; fields are standardised with statistics pooled over the time channels (one mean and std for every step, so
a state means the same whatever k it is), and sampling rolls out autoregressively (trainer/diffusion/sampling.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trainer.models.losses import operator_example_batch, relative_l2
from trainer.registry import Batch, DataSpec, ModelSpec, get_model_spec, register_model


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM's Table 1 coefficients, sigma_data = sd:

        c_skip  = sd^2 / (sigma^2 + sd^2)
        c_out   = sigma sd / sqrt(sigma^2 + sd^2)
        c_in    = 1 / sqrt(sigma^2 + sd^2)
        c_noise = ln(sigma) / 4
    """

    def __init__(self, backbone: nn.Module, sigma_data: float, emb_dim: int, cond_channels: int = 0):
        super().__init__()
        self.backbone, self.sigma_data, self.cond_channels = backbone, float(sigma_data), cond_channels
        self.embed = NoiseEmbedding(emb_dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, *grid) at noise level sigma (B,) -> the denoised estimate, same shape as x."""
        if (cond is None) != (self.cond_channels == 0):
            raise ValueError(f"the model takes {self.cond_channels} conditioning channels; got "
                             f"{'none' if cond is None else tuple(cond.shape)}")
        sd = self.sigma_data
        s = sigma.to(x.dtype).reshape(-1, *(1,) * (x.ndim - 1))
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        c_noise = sigma.to(torch.float32).log() / 4
        inp = c_in * x if cond is None else torch.cat([c_in * x, cond.to(x.dtype)], dim=1)
        F_x = self.backbone(inp.float(), self.embed(c_noise)).to(x.dtype)
        return c_skip * x + c_out * F_x

    def denoiser(self, cond: torch.Tensor | None = None):
        """D as a sampler's `denoiser(x, sigma)`, the conditioning fixed (one condition per sample of x)."""
        return lambda x, sigma: self(x, sigma, cond)


class NoiseEmbedding(nn.Module):
    """c_noise -> (B, dim): sinusoids of geometrically spaced frequencies (EDM's PositionalEmbedding, max_positions
    1e4), then a two-layer MLP with SiLU."""

    def __init__(self, dim: int, max_positions: float = 1e4):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / half),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.float()[:, None] * self.freqs[None, :].to(c_noise.device)
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


# ---- the EDM loss ------------------------------------------------------------------------------------------------
def edm_sigmas(batch: int, p_mean: float, p_std: float, device=None) -> torch.Tensor:
    """Training noise levels: ln sigma ~ N(P_mean, P_std^2) (EDM Table 1)."""
    return (p_mean + p_std * torch.randn(batch, device=device)).exp()


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (EDM Table 1): = 1 / c_out^2, so every sigma's target
    F has unit variance."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_loss(model: nn.Module, batch: Batch, data: DataSpec) -> tuple[torch.Tensor, dict]:
    """E_sigma E_n lambda(sigma) |D(y + sigma n; sigma) - y|^2, averaged over batch and elements (EDM Eq. 2, 8)."""
    core = unwrap_edm(model)
    cond, y = model_pairs(core, batch, data)
    sigma = edm_sigmas(len(y), core.cfg.p_mean, core.cfg.p_std, y.device)
    s = sigma.reshape(-1, *(1,) * (y.ndim - 1))
    denoised = model(y + s * torch.randn_like(y), sigma, cond)
    loss = (edm_weight(s, core.sigma_data) * (denoised - y) ** 2).mean()
    return loss, {"edm_loss": loss.item()}


def model_pairs(core: "EDMPrecond", batch: Batch, data: DataSpec,
                k: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(condition or None, target) in the model's space from a loader batch. Trajectories: (w_k, w_{k+1}) with k
    random per sample (the rank's RNG stream) or the given k, standardised with the pooled statistics."""
    if core.cfg.pairs == "fields":
        return (batch["x"] if core.cfg.conditional else None), batch["y"]
    mean, std = trajectory_stats(data)
    traj = (data.target_norm.decode(batch["y"]) - mean) / std            # (B, T, *grid)
    B, T = traj.shape[:2]
    ks = (torch.randint(0, T - 1, (B,), device=traj.device) if k is None
          else torch.full((B,), k, device=traj.device))
    rows = torch.arange(B, device=traj.device)
    return traj[rows, ks].unsqueeze(1), traj[rows, ks + 1].unsqueeze(1)


def trajectory_stats(data: DataSpec) -> tuple[float, float]:
    """One mean and std over all time channels from the store's per-channel statistics (equal counts per channel):
    m = mean_c m_c, s^2 = mean_c (s_c^2 + m_c^2) - m^2."""
    m_c, s_c = data.target_norm.mean.double(), data.target_norm.std.double()
    m = m_c.mean()
    return float(m), float(((s_c ** 2 + m_c ** 2).mean() - m ** 2).clamp_min(0).sqrt()) + data.target_norm.eps


def to_physical(core: "EDMPrecond", data: DataSpec, t: torch.Tensor) -> torch.Tensor:
    """Model-space targets (B, C, *grid) in the store's units."""
    if core.cfg.pairs == "fields":
        return data.target_norm.decode(t)
    mean, std = trajectory_stats(data)
    return t * std + mean


def unwrap_edm(model: nn.Module) -> EDMPrecond:
    """The EDMPrecond inside whatever wrapper an engine put around it (each keeps it as `.module`)."""
    while not isinstance(model, EDMPrecond):
        model = model.module
    return model


def eval_step(time_channels: int) -> int:
    """The trajectory step k evaluated (w_{k+1} given w_k): the middle of the recorded times."""
    return max(0, (time_channels - 1) // 2)


# Fixed noise levels (spanning EDM's training distribution, ln sigma = P_mean +- 2 P_std) for a test error that does
# not depend on the RNG: the denoiser's relative L2 at each, averaged.
EVAL_SIGMAS = (0.05, 0.3, 1.0, 3.0)


def edm_denoising_errors(model: nn.Module, batch: Batch, data: DataSpec) -> torch.Tensor:
    """Per-sample relative L2 of D(y + sigma n; sigma) against y, averaged over EVAL_SIGMAS; the noise n is drawn
    from a generator seeded by the data (the same for every evaluation of the same samples)."""
    core = unwrap_edm(model)
    cond, y = model_pairs(core, batch, data, k=eval_step(batch["y"].shape[1]))
    g = torch.Generator(device=y.device).manual_seed(int(y.shape[0]) * 7919 + len(EVAL_SIGMAS))
    errs = []
    for sigma in EVAL_SIGMAS:
        s = torch.full((len(y),), sigma, device=y.device)
        noise = torch.randn(y.shape, generator=g, device=y.device, dtype=y.dtype)
        denoised = model(y + sigma * noise, s, cond)
        errs.append(relative_l2(to_physical(core, data, denoised), to_physical(core, data, y)))
    return torch.stack(errs).mean(0)


# ---- registration ------------------------------------------------------------------------------------------------
@dataclass
class EDMConfig:
    """[model.edm]"""
    backbone: str = "fno"          # a registered operator; its own table ([model.fno]) sets its size
    conditional: bool = True       # the store's inputs condition the model (extra input channels)
    pairs: str = "fields"          # "fields": targets given inputs; "trajectory": w_{k+1} given w_k of the targets
    sigma_data: float = 0.0        # 0: from the store's statistics (see _sigma_data)
    p_mean: float = -1.2           # training ln sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    emb_dim: int = 64              # noise embedding width
    sigma_min: float = 0.002       # the sampling range (schedules)
    sigma_max: float = 80.0
    # evaluation during training (DiffusionTrainer.evaluate): an ensemble for each of the first test conditions
    eval_conditions: int = 8
    eval_members: int = 8
    eval_sampler: str = "dpmpp_2m"
    eval_steps: int = 10

    def __post_init__(self):
        if self.pairs not in ("fields", "trajectory"):
            raise ValueError(f"config key 'model.edm.pairs' = {self.pairs!r}; allowed: 'fields', 'trajectory'")
        if self.pairs == "trajectory" and not self.conditional:
            raise ValueError("config key 'model.edm.pairs' = 'trajectory' conditions each state on the previous one: "
                             "model.edm.conditional must be true")
        for k in ("sigma_min", "sigma_max", "p_std", "emb_dim", "eval_conditions", "eval_members", "eval_steps"):
            if getattr(self, k) <= 0:
                raise ValueError(f"config key 'model.edm.{k}' = {getattr(self, k)!r}; must be > 0")
        if self.sigma_data < 0:
            raise ValueError(f"config key 'model.edm.sigma_data' = {self.sigma_data!r}; must be > 0 (or 0: from the "
                             "store's statistics)")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"config keys 'model.edm.sigma_min' = {self.sigma_min} and 'sigma_max' = "
                             f"{self.sigma_max}: need sigma_min < sigma_max")
        if self.emb_dim % 2:
            raise ValueError(f"config key 'model.edm.emb_dim' = {self.emb_dim}; must be even (cos and sin pairs)")
        from trainer.diffusion.samplers import SAMPLERS
        if self.eval_sampler not in SAMPLERS:
            raise ValueError(f"config key 'model.edm.eval_sampler' = {self.eval_sampler!r}; allowed: "
                             f"{', '.join(map(repr, SAMPLERS))}")
        from trainer.registry import MODELS
        import trainer.models  # noqa: F401  (registers the built-in models)
        backbones = [n for n, s in MODELS.items() if s.backbone is not None]
        if self.backbone not in backbones:
            raise ValueError(f"config key 'model.edm.backbone' = {self.backbone!r}; allowed: "
                             f"{', '.join(map(repr, backbones))}")


def _sigma_data(cfg: EDMConfig, data: DataSpec) -> float:
    """The targets' standard deviation in the space the model sees. The loader standardises each channel c with the
    store's (mean_c, std_c), so a channel's variance there is std_c^2 / (std_c + eps)^2; sigma_data is the root of
    their mean over channels (1 up to eps for non-constant channels)."""
    if cfg.sigma_data > 0:
        return cfg.sigma_data
    if cfg.pairs == "trajectory":   # standardised with the pooled statistics themselves
        return 1.0
    norm = data.target_norm
    var = (norm.std / (norm.std + norm.eps)) ** 2
    return math.sqrt(float(var.mean()))


def _check(cfg: EDMConfig, data: DataSpec) -> None:
    get_model_spec(cfg.backbone).check(cfg.backbone_config, data)
    if cfg.pairs == "trajectory" and data.target_shape[0] < 2:
        raise ValueError(f"model.edm.pairs = 'trajectory' reads the targets as a trajectory (one channel per time); "
                         f"they have {data.target_shape[0]} channel: no pair of consecutive states")
    if _sigma_data(cfg, data) <= 0:
        raise ValueError("the store's target statistics give sigma_data = 0 (constant targets): nothing to model; "
                         "set model.edm.sigma_data")


def _build(cfg: EDMConfig, data: DataSpec) -> EDMPrecond:
    out = 1 if cfg.pairs == "trajectory" else data.target_shape[0]
    cond = out if cfg.pairs == "trajectory" else data.input_shape[0] if cfg.conditional else 0
    backbone = get_model_spec(cfg.backbone).backbone(cfg.backbone_config, out + cond, out, cfg.emb_dim)
    model = EDMPrecond(backbone, _sigma_data(cfg, data), cfg.emb_dim, cond)
    model.cfg = cfg
    return model


def _shard_units(model: EDMPrecond) -> list[nn.Module]:
    return [model.embed, *get_model_spec(model.cfg.backbone).shard_units(model.backbone)]


register_model(ModelSpec(name="edm", config=EDMConfig, check=_check, build=_build, loss=edm_loss,
                         evaluate=edm_denoising_errors, example_batch=operator_example_batch, shard_units=_shard_units,
                         trainer="trainer.diffusion.trainer:DiffusionTrainer"))

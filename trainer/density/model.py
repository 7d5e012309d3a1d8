"""A diffusion sampler of an unnormalised density as a registered model (`model.name = "density_sampler"`): a
policy network and the objective that trains it, with a data source that simulates its batches.

    [model]
    name = "density_sampler"
    [model.density_sampler]
    target = "gmm25"          # trainer/density/targets.py, or "package.module:callable"
    method = "tb"             # "pis", "dds", "tb", "vargrad"

The whole simulation runs inside the module's forward (one forward per backward, as DDP, FSDP2 and ZeRO expect),
and the step's noise is drawn for the global batch from a generator seeded by (seed, step), each rank taking its
rows: a global batch of 300 gives the same trajectories, and so the same first-step gradient to rounding, on 1 rank
x 300 or 2 x 150. The objectives are trainer/density/objectives.py's; the processes trainer/density/sde.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.compress.base import mixed_seed
from trainer.density import objectives
from trainer.density.sde import OU_BETA, ou_constant, ou_cos_sq, simulate_backward, simulate_forward
from trainer.density.targets import checked_log_prob, get_target
from trainer.registry import Batch, DataSpec, ModelSpec, register_model

METHODS = ("pis", "dds", "tb", "vargrad")
REPARAMETERISED = ("pis", "dds")   # differentiate through the simulated path; on-policy only
OU_SCHEDULES = ("constant", "cos_sq")


@dataclass
class DensitySamplerConfig:
    """[model.density_sampler] (Sendera et al. 2024, Sec. 5.1 and App. D, for the defaults)."""
    target: str = "gmm25"
    target_params: dict = field(default_factory=dict)
    method: str = "tb"
    T: int = 100                   # steps on [0, 1]
    sigma: float = 1.0             # diffusion coefficient (sigma^2 = 5 for 25GMM, 1 for Funnel and Manywell)
    width: int = 64
    layers: int = 2                # hidden layers of the joint network
    langevin: bool = False         # u = NN1(t, x) + NN2(t) * clip(grad log pi(x)), NN2(t) in R^d (PIS's form)
    grad_clip: float = 1e4         # the Langevin term's clip
    out_clip: float = 1e4          # the network's outputs (drift, log-variance) clipped to +-out_clip after the
                                   # Langevin term (gfn-diffusion's --clipping, --gfn_clip 1e4)
    learned_variance: bool = False
    # DDS's OU reference (trainer/density/sde.py): "constant" rate ou_beta, or DDS's cos_sq steps, whose noise
    # sum_k b_k^2 = ou_alpha^2 ou_tfinal (DDS's Funnel settings: alpha 0.6875, tfinal 6.4)
    ou_schedule: str = "constant"
    ou_beta: float = OU_BETA
    ou_alpha: float = 0.6875
    ou_tfinal: float = 6.4
    exploration_std: float = 0.0   # off-policy noise (std) added to each step (TB, VarGrad), decayed linearly to 0
    exploration_until: float = 0.2     # ... over this fraction of the run (gfn-diffusion's --exploration_wd:
                                       # factor * max(0, 1 - it / 5000), the first 5,000 of 25,000 iterations)
    log_z_scale: float = 100.0     # TB: log Z = scale * theta, so Adam moves log Z scale x lr per step (1e-1 at 1e-3)
    # Sendera et al.'s local search (TB only; gfn-diffusion's two buffers, each sharded over ranks and checkpointed):
    # the policy's samples go to one; every ls_every steps a batch drawn from it runs ls_steps of MALA, whose
    # proposals accepted after ls_burn_in steps go to the other; every other step trains on backward trajectories
    # from the second
    local_search: bool = False
    buffer_size: int = 600000      # each buffer's
    ls_every: int = 100
    ls_steps: int = 200
    ls_burn_in: int = 100
    ls_step_size: float = 0.1
    ls_target_acceptance: float = 0.574   # MALA's optimal acceptance (Roberts & Rosenthal 1998); the step adapts
    eval_samples: int = 2000       # trajectories (and exact target samples) for the estimates

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"config key 'model.density_sampler.method' = {self.method!r}; allowed: "
                             f"{', '.join(map(repr, METHODS))}")
        for k in ("T", "width", "layers", "eval_samples"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config key 'model.density_sampler.{k}' = {v!r}; must be an integer >= 1")
        if self.ou_schedule not in OU_SCHEDULES:
            raise ValueError(f"config key 'model.density_sampler.ou_schedule' = {self.ou_schedule!r}; allowed: "
                             f"{', '.join(map(repr, OU_SCHEDULES))}")
        for k in ("sigma", "grad_clip", "out_clip", "log_z_scale", "ou_beta", "ou_alpha", "ou_tfinal"):
            if not 0 < getattr(self, k) < math.inf:
                raise ValueError(f"config key 'model.density_sampler.{k}' = {getattr(self, k)!r}; must be > 0")
        if self.exploration_std < 0 or not 0 <= self.exploration_until <= 1:
            raise ValueError("config keys 'model.density_sampler.exploration_std' (>= 0) and 'exploration_until' "
                             f"(in [0, 1]): got {self.exploration_std!r}, {self.exploration_until!r}")
        if self.local_search and self.method != "tb":
            raise ValueError(f"config key 'model.density_sampler.local_search' = true needs method 'tb' (off-policy "
                             f"training on buffer samples); got {self.method!r}")
        for k in ("buffer_size", "ls_every", "ls_steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"config key 'model.density_sampler.{k}' = {getattr(self, k)!r}; must be >= 1")
        if not 0 <= self.ls_burn_in < self.ls_steps:
            raise ValueError(f"config key 'model.density_sampler.ls_burn_in' = {self.ls_burn_in!r}; must be in "
                             f"[0, ls_steps = {self.ls_steps})")
        if self.exploration_std > 0 and self.method in REPARAMETERISED:
            raise ValueError(f"config key 'model.density_sampler.exploration_std' = {self.exploration_std}: "
                             f"method {self.method!r} differentiates through on-policy paths; exploration is for "
                             "'tb' and 'vargrad'")

    @property
    def reference(self) -> str:
        return "ou" if self.method == "dds" else "brownian"

    def ou_noise(self) -> list[float] | None:
        """The OU steps' b_k^2 (None for the Brownian reference)."""
        if self.reference != "ou":
            return None
        if self.ou_schedule == "cos_sq":
            return ou_cos_sq(self.T, self.ou_alpha, self.ou_tfinal)
        return ou_constant(self.T, self.ou_beta)


class TimeEmbedding(nn.Module):
    """t in [0, 1] -> (n, dim): PIS's time encoding (Zhang & Chen 2022, its FourierMLP): sin and cos of
    c_j t + phi_j, c_j = linspace(0.1, 100, dim), phi_j learned (initialised N(0, 1)), then Linear, GELU, Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("coeff", torch.linspace(0.1, 100.0, dim), persistent=False)
        self.phase = nn.Parameter(torch.randn(dim))
        self.proj = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = t[:, None] * self.coeff[None].to(t.dtype) + self.phase[None]
        return self.proj(torch.cat([a.sin(), a.cos()], 1))


class Policy(nn.Module):
    """PIS's drift network (Zhang & Chen 2022; gfn-diffusion's --pis_architectures):
        u(t, x) = Linear(GELU(Linear(GELU(... GELU(embed(t) + W x + b)))))      (`layers` hidden Linear + GELU)
    (+ NN2(t) clip(grad log pi(x)) with Langevin); the last layers start at zero, so training starts from the
    reference process."""

    def __init__(self, dim: int, cfg: DensitySamplerConfig):
        super().__init__()
        w = cfg.width
        self.t_embed = TimeEmbedding(w)
        self.x_embed = nn.Linear(dim, w)
        layers = [nn.GELU()]
        for _ in range(cfg.layers):
            layers += [nn.Linear(w, w), nn.GELU()]
        out = nn.Linear(w, 2 * dim if cfg.learned_variance else dim)
        nn.init.zeros_(out.weight), nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)
        self.langevin = None
        if cfg.langevin:
            last = nn.Linear(w, dim)       # a weight per coordinate, as PIS's and DDS's code
            nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)
            self.langevin = nn.Sequential(TimeEmbedding(w), nn.GELU(), last)
        self.learned_variance, self.grad_clip, self.out_clip = cfg.learned_variance, cfg.grad_clip, cfg.out_clip

    def forward(self, t: torch.Tensor, x: torch.Tensor, grad_log_pi=None):
        h = self.net(self.t_embed(t) + self.x_embed(x))
        drift, log_var = (h.chunk(2, dim=1) if self.learned_variance else (h, None))
        if self.langevin is not None:
            g = grad_log_pi(x.detach()).clamp(-self.grad_clip, self.grad_clip)
            drift = drift + self.langevin(t) * g
        c = self.out_clip
        return drift.clamp(-c, c), None if log_var is None else log_var.clamp(-c, c)


class DensitySampler(nn.Module):
    """The policy (and, for TB, log Z); forward simulates this rank's trajectories and returns their log-densities."""

    def __init__(self, cfg: DensitySamplerConfig, target):
        super().__init__()
        self.cfg, self.target = cfg, target
        self.policy = Policy(target.dim, cfg)
        self.log_z_theta = nn.Parameter(torch.zeros(1)) if cfg.method == "tb" else None
        self.buffer = None        # trainer.density.buffer.ReplayBuffer of the policy's samples (local search)
        self.buffer_ls = None     # ... of local search's accepted proposals, which the backward steps draw from
        self.pending = None       # (x_T, log R) of the last step's forward trajectories, for the buffer

    def log_z(self) -> torch.Tensor | None:
        return None if self.log_z_theta is None else self.cfg.log_z_scale * self.log_z_theta[0]

    def drift(self, t: torch.Tensor, x: torch.Tensor):
        return self.policy(t, x, self.target.grad_log_prob if self.cfg.langevin else None)

    def forward(self, n: int, noise, exploration_std: float = 0.0, x1: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """n forward trajectories, step k's standard normal noise noise(k) (n, d) (k = -1: the OU start), or, given
        x1, backward ones ending there (drawn from `generator`): per-trajectory sums of log p_F and log p_B,
        log R(x_T) and x_T (and log Z for TB)."""
        c = self.cfg
        p = next(self.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        if x1 is None:
            traj = simulate_forward(self.drift, n, c.T, c.sigma, None, exploration_std, dim=self.target.dim,
                                    reference=c.reference, ou_noise=c.ou_noise(),
                                    keep_graph=c.method in REPARAMETERISED,
                                    dtype=dtype, device=p.device, noise=noise)
        else:
            traj = simulate_backward(self.drift, x1.to(dtype), c.T, c.sigma, generator, reference=c.reference,
                                     ou_noise=c.ou_noise())
        x_T = traj.x[:, -1]
        out = {"log_pf": traj.log_pf.sum(1), "log_pb": traj.log_pb.sum(1), "x": x_T,
               "log_reward": checked_log_prob(self.target, x_T)}
        if self.log_z_theta is not None:
            out["log_z"] = self.log_z()
        return out


def unwrap(model: nn.Module) -> DensitySampler:
    while not isinstance(model, DensitySampler):
        model = model.module
    return model


# ---- the loss: one step of the configured objective --------------------------------------------------------------
def global_noise(seed: int, step: int, first: int, n: int, global_n: int, dim: int):
    """noise(k): rows [first, first + n) of the global batch's standard normal noise at step k of training step
    `step` (each (seed, step, k) its own generator): the same trajectories however the batch is split over ranks."""
    def noise(k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mixed_seed(seed, step, k + 1))
        return torch.randn(global_n, dim, generator=g)[first:first + n]
    return noise


def exploration_at(cfg: DensitySamplerConfig, step: int, total: int) -> float:
    """exploration_std decayed linearly to 0 at exploration_until x the run (gfn-diffusion's get_exploration_std)."""
    if cfg.exploration_std == 0 or cfg.exploration_until == 0:
        return 0.0
    return cfg.exploration_std * max(0.0, 1 - step / (cfg.exploration_until * total))


OBJECTIVES = {"tb": objectives.trajectory_balance_loss, "pis": objectives.pis_loss,
              "dds": objectives.denoising_diffusion_sampler_loss}


def sampler_loss(model: nn.Module, batch: Batch, data: DataSpec) -> tuple[torch.Tensor, dict]:
    """The configured objective on this rank's rows of the step's global batch (batch: from SimulationSource)."""
    core = unwrap(model)
    c = core.cfg
    b = {k: int(v) for k, v in batch.items()}
    core.pending = None
    if core.buffer_ls is not None and b["step"] % 2 == 1 and len(core.buffer_ls) > 0:   # off-policy
        g = torch.Generator().manual_seed(mixed_seed(b["seed"], b["step"], b["first"]))
        x1, _ = core.buffer_ls.sample(b["n"], g)
        out = model(b["n"], None, x1=x1, generator=g)
    else:
        noise = global_noise(b["seed"], b["step"], b["first"], b["n"], b["global_n"], core.target.dim)
        out = model(b["n"], noise, exploration_at(c, b["step"], b["total"]))
        core.pending = (out["x"].detach(), out["log_reward"].detach())
    if c.method == "vargrad":   # the batch is the global one: its mean log w is taken over every rank's rows
        loss = vargrad_global(out["log_pf"], out["log_pb"], out["log_reward"], b["global_n"])
    else:
        args = (out["log_pf"], out["log_pb"], out["log_reward"]) + ((out["log_z"],) if c.method == "tb" else ())
        loss = OBJECTIVES[c.method](*args)
    return loss, {"loss": loss.item()}


def vargrad_global(log_pf: torch.Tensor, log_pb: torch.Tensor, log_reward: torch.Tensor, global_n: int) -> torch.Tensor:
    """VarGrad over the global batch: mean over this rank's rows of (r_i - r_bar)^2, r = log p_F - log p_B - log R,
    r_bar the global batch mean (detached: it has the variance's value and gradient, objectives.vargrad_loss), so
    the ranks' losses averaged by the engine are the global batch variance."""
    r = log_pf - log_pb - log_reward
    total = r.detach().sum().reshape(1)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total)
    return ((r - total / global_n) ** 2).mean()


# ---- registration (trainer/registry.py) ----------------------------------------------------------------------------
def _build(cfg: DensitySamplerConfig, data: DataSpec) -> DensitySampler:
    return DensitySampler(cfg, get_target(cfg.target, **cfg.target_params))


def _example_batch(data: DataSpec, rows: int = 2) -> Batch:
    return {k: torch.tensor(v) for k, v in dict(seed=0, step=0, total=1, first=0, n=rows, global_n=rows).items()}


register_model(ModelSpec(
    name="density_sampler", config=DensitySamplerConfig, check=lambda cfg, data: None, build=_build, loss=sampler_loss,
    evaluate=lambda model, batch, data: torch.zeros(0), example_batch=_example_batch,
    shard_units=lambda model: [model.policy.t_embed, model.policy.x_embed, model.policy.net],
    trainer="trainer.density.trainer:DensityTrainer", source="trainer.density.trainer:SimulationSource"))

"""Replay buffer and Langevin local search for off-policy diffusion samplers (Sendera et al. 2024, Sec. 4).

    buffer = ReplayBuffer(capacity=600_000, dim=target.dim, rank=rank, world_size=world)
    buffer.add(x_bd, log_reward_b)                         # drops (and counts) rows with a NaN or inf
    x_bd, log_reward_b = buffer.sample(B, generator=g)    # rank-prioritised draws from this rank's shard
    x_bd, log_reward_b, acc = local_search(target, x_bd, steps=200, step_size=0.1, generator=g)
    x_md, log_reward_m, acc = local_search(target, x_bd, 200, 0.1, g, burn_in=100)   # accepted after burn-in

What Sendera et al. do, from their code (gfn-diffusion: energy_sampling/{train,buffer,langevin}.py, and the README's
"TB + Expl. + LS" command; the paper's own text is not quoted here). There are two buffers, both
holding 600,000 samples. The first takes the policy's terminal samples. Every ls_cycle = 100 iterations a batch drawn
from it runs max_iter_ls = 200 Langevin steps, and the proposals accepted after burn_in = 100 steps go into the
second. The backward (off-policy) TB steps draw from the second. Both buffers use rank-based prioritisation with
k = 0.01 (--rank_weight). Their Langevin step has a Metropolis-Hastings correction, which makes it MALA. Its step size
(0.1 for Manywell, 0.001 for the VAE) is multiplied by 1.01 or 0.99 each step to bring the acceptance rate towards
0.574 (--ld_schedule --target_acceptance_rate 0.574), the optimal MALA acceptance of Roberts & Rosenthal (1998).

Where this file differs from that code:
- Eviction. Their buffer drops its OLDEST entries (a FIFO deque), not its lowest rewards. "fifo" is therefore the
  default here. "reward" keeps the highest rewards ever seen, and rank prioritisation already favours those. On an
  asymmetric target such as Manywell (the two wells' peaks differ by 1.73 nats per coordinate) it would pin the
  buffer to the best wells found early, even after the policy has moved on.
- local_search with burn_in returns, as theirs does, every proposal accepted after the first burn_in steps (a
  variable number of rows; each rank adds its own to its shard). Theirs collects from 0-based step burn_in + 1 on
  (99 of 200 steps), this from step burn_in on (100 of 200). Without burn_in it returns each chain's final state.
  Each call starts at the given step_size, as their code does.
- Adaptation updates the step from the acceptance of the step just taken, over the batch. Theirs uses the rate last
  measured at a multiple of 5 steps (the first step alone, then windows of 5), so it lags by up to 5 steps.
  Adaptation is off by default (target_acceptance None). The step size then stays fixed, and the chain is exact
  MALA, which leaves pi invariant. An adapted step depends on the chains' past, so the chain is no longer exactly
  invariant.

Sharding. Each rank keeps only what it added, at most capacity // world_size rows, and samples from its own shard.
With the global batch's rows split across ranks, each shard is an iid subsample of what a single global buffer would
hold. Shard rank r' ~ r / R and k N_r = k N / R, so each rank's weights 1/(k N_r + r') approximate R / (k N + r), the
global distribution, up to ties at the top. The checkpoint keeps every shard under its own key "rank{r}", as
checkpoint.RNGState does, so DCP does not de-duplicate them. A shard is a fixed-shape (capacity // world_size, d)
tensor, because DCP loads in place and refuses a size mismatch. A rank that finds no shard of its own (the world grew)
starts empty with a warning. If capacity // world_size has changed, DCP raises its size-mismatch error, naming the key.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.distributed.checkpoint.stateful import Stateful

from trainer.density.targets import Target

log = logging.getLogger("fieldtrain")

PRIORITIZATIONS = ("rank", "uniform")
EVICTIONS = ("fifo", "reward")
RANK_K = 0.01               # gfn-diffusion's --rank_weight, default and README
TARGET_ACCEPTANCE = 0.574   # their --target_acceptance_rate (Roberts & Rosenthal 1998)
ADAPT_FACTOR = 0.01         # their adjust_ld_step's adjustment_factor


def _int(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"replay buffer: {name!r} = {value!r}; must be an integer >= {least}")
    return value


def _generator(generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator = {generator!r}; must be a torch.Generator (draws are reproducible and resumable "
                         f"only from a generator the caller owns)")
    return generator


class ReplayBuffer(Stateful):
    """This rank's shard of a replay buffer of terminal samples x (n, d) and their log rewards (n,).

    Rank-based prioritisation (Tripp et al. 2020, "Sample-efficient optimization in the latent space of deep
    generative models via weighted retraining"; gfn-diffusion's buffer.py):
        P(i) = w_i / sum_j w_j,   w_i = 1 / (k N + rank_i),   k = 0.01,
    where N is the number of entries held and rank_i runs from 0 (the highest log reward) to N - 1. Ties are broken
    by age, older first, so the ranks are distinct, as gfn-diffusion's argsort of argsorts makes them. "uniform" gives
    every entry 1/N.
    Eviction once full: "fifo" drops the oldest entries (gfn-diffusion). "reward" drops the lowest log rewards, the
    oldest first among ties, so the shard keeps the capacity best rows ever added.
    """

    def __init__(self, capacity: int, dim: int, rank: int, world_size: int, prioritization: str = "rank",
                 eviction: str = "fifo", rank_k: float = RANK_K, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        _int("world_size", world_size, 1)
        _int("capacity", capacity, world_size)
        _int("dim", dim, 1)
        if _int("rank", rank, 0) >= world_size:
            raise ValueError(f"replay buffer: 'rank' = {rank!r}; must be < world_size = {world_size}")
        if prioritization not in PRIORITIZATIONS:
            raise ValueError(f"replay buffer: 'prioritization' = {prioritization!r}; allowed: "
                             f"{', '.join(map(repr, PRIORITIZATIONS))}")
        if eviction not in EVICTIONS:
            raise ValueError(f"replay buffer: 'eviction' = {eviction!r}; allowed: {', '.join(map(repr, EVICTIONS))}")
        if isinstance(rank_k, bool) or not isinstance(rank_k, (int, float)) or not 0 < rank_k < math.inf:
            raise ValueError(f"replay buffer: 'rank_k' = {rank_k!r}; must be a number > 0")
        self.rank, self.world_size, self.dim = rank, world_size, dim
        self.prioritization, self.eviction, self.rank_k = prioritization, eviction, float(rank_k)
        self.capacity = capacity // world_size                  # this rank's shard
        dtype = dtype or torch.get_default_dtype()
        self.x = torch.zeros(self.capacity, dim, dtype=dtype, device=device)               # (C, d); rows [:size] held
        self.log_reward = torch.full((self.capacity,), -math.inf, dtype=dtype, device=device)
        self.order = torch.full((self.capacity,), -1, dtype=torch.long, device=device)    # insertion index of each row
        self.size = 0       # rows held
        self.added = 0      # rows ever stored (the next insertion index)
        self.dropped = 0    # rows refused for a non-finite x or log reward
        self._ranking = None    # (slots by rank, cdf of the rank weights), kept until the rows change

    def __len__(self) -> int:
        return self.size

    def add(self, x: torch.Tensor, log_reward: torch.Tensor) -> int:
        """Store the rows of x (n, d) and log_reward (n,) whose values are all finite after conversion to the buffer's
        dtype, evicting rows if the shard is full. Returns how many rows were dropped as non-finite (also added to
        `dropped`). A NaN never enters the buffer."""
        if x.ndim != 2 or x.shape[1] != self.dim or log_reward.shape != (x.shape[0],):
            raise ValueError(f"replay buffer: add(x, log_reward) takes x (n, {self.dim}) and log_reward (n,); got "
                             f"{tuple(x.shape)} and {tuple(log_reward.shape)}")
        x, lr = x.detach().to(self.x), log_reward.detach().to(self.log_reward)
        self._ranking = None
        ok = torch.isfinite(lr) & torch.isfinite(x).all(1)
        bad = int((~ok).sum())
        self.dropped += bad
        x, lr = x[ok], lr[ok]
        order = torch.arange(self.added, self.added + len(lr), device=self.order.device)
        self.added += len(lr)
        free = min(self.capacity - self.size, len(lr))
        held = slice(self.size, self.size + free)
        self.x[held], self.log_reward[held], self.order[held] = x[:free], lr[:free], order[:free]
        self.size += free
        if free < len(lr):
            self._evict_into(x[free:], lr[free:], order[free:])
        return bad

    def _evict_into(self, x: torch.Tensor, lr: torch.Tensor, order: torch.Tensor) -> None:
        """The shard is full and r more rows come: of the C + r rows, the r first in eviction order go, and the new rows
        that stay take the slots of the old rows that went (as many of each)."""
        C, r = self.capacity, len(lr)
        all_lr, all_order = torch.cat([self.log_reward, lr]), torch.cat([self.order, order])
        if self.eviction == "reward":
            first = torch.argsort(all_order, stable=True)                           # oldest first
            gone = first[torch.argsort(all_lr[first], stable=True)][:r]            # lowest first; oldest among ties
        else:   # the r oldest (insertion indices are distinct): a selection, not a sort of the whole shard
            gone = torch.topk(all_order, r, largest=False).indices
        slots = gone[gone < C].sort().values
        stays = torch.ones(r, dtype=torch.bool, device=lr.device)
        stays[gone[gone >= C] - C] = False
        self.x[slots], self.log_reward[slots], self.order[slots] = x[stays], lr[stays], order[stays]

    def ranked(self) -> torch.Tensor:
        """(size,) slots from the highest log reward down, older first among ties: slot of rank 0, 1, ..."""
        lr, order = self.log_reward[:self.size], self.order[:self.size]
        by_age = torch.argsort(order, stable=True)
        return by_age[torch.argsort(lr[by_age], descending=True, stable=True)]

    def _rank_weights(self, device=None) -> torch.Tensor:
        """(size,) float64 w = 1 / (k N + rank), rank = 0, 1, ..., N - 1."""
        return 1.0 / (self.rank_k * self.size + torch.arange(self.size, dtype=torch.float64, device=device))

    def probabilities(self) -> torch.Tensor:
        """(size,) float64 sampling probability of each held slot (slot order)."""
        n = self.size
        if self.prioritization == "uniform":
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        w = self._rank_weights()
        p = torch.empty(n, dtype=torch.float64)
        p[self.ranked().cpu()] = w / w.sum()
        return p

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws with replacement, x (n, d) and log_reward (n,) (copies), using `generator` alone, so the same
        generator state and buffer state give the same rows."""
        _int("n", n, 0)
        generator = _generator(generator)
        if self.size == 0:
            raise ValueError(f"replay buffer (rank {self.rank}): sample({n}) from an empty buffer; add samples first")
        dev = generator.device
        if self.prioritization == "uniform":
            slots = torch.randint(self.size, (n,), generator=generator, device=dev)
        else:   # inverse CDF over ranks (no category limit, unlike torch.multinomial's 2^24)
            if self._ranking is None or self._ranking[1].device != torch.device(dev):
                # two sorts of the shard: 0.16 s at 600,000 rows, once per change instead of once per draw
                self._ranking = (self.ranked().to(dev), torch.cumsum(self._rank_weights(dev), 0))
            ranked, cdf = self._ranking
            u = torch.rand(n, generator=generator, dtype=torch.float64, device=dev) * cdf[-1]
            pos = torch.searchsorted(cdf, u, right=True).clamp_(max=self.size - 1)
            slots = ranked[pos]
        slots = slots.to(self.x.device)
        return self.x[slots], self.log_reward[slots]

    # ---- Stateful: this rank's shard under its own key (checkpoint.RNGState's convention) ----
    def per_rank_keys(self) -> list[str]:
        return [f"rank{self.rank}"]

    def state_dict(self) -> dict:
        return {f"rank{self.rank}": {
            "x": self.x.clone(), "log_reward": self.log_reward.clone(), "order": self.order.clone(),
            "size": torch.tensor(self.size), "added": torch.tensor(self.added), "dropped": torch.tensor(self.dropped)}}

    def load_state_dict(self, state: dict) -> None:
        mine = state.get(f"rank{self.rank}")
        if mine is None:
            log.warning("checkpoint has no replay buffer shard for rank %d (saved by a smaller world); starting it "
                        "empty", self.rank)
            return
        if tuple(mine["x"].shape) != tuple(self.x.shape):
            raise ValueError(f"replay buffer shard rank{self.rank}: the checkpoint's x is {tuple(mine['x'].shape)}, "
                             f"this run's {tuple(self.x.shape)} (capacity // world_size or the target's dim changed)")
        size = int(mine["size"])
        assert 0 <= size <= self.capacity, f"replay buffer shard rank{self.rank}: size {size} > {self.capacity}"
        self.x.copy_(mine["x"])
        self.log_reward.copy_(mine["log_reward"])
        self.order.copy_(mine["order"])
        self.size, self.added, self.dropped = size, int(mine["added"]), int(mine["dropped"])
        self._ranking = None


# ---- local search: Langevin steps on the target ----
def langevin_log_proposal(x_to: torch.Tensor, x_from: torch.Tensor, grad_from: torch.Tensor,
                          step_size: float) -> torch.Tensor:
    """(n,) log q(x_to | x_from) = log N(x_to; x_from + eta grad log pi(x_from), 2 eta I), without its constant
    (the constant cancels in the MH ratio)."""
    return -(x_to - x_from - step_size * grad_from).pow(2).sum(1) / (4 * step_size)


def mala_log_acceptance(target: Target, x: torch.Tensor, y: torch.Tensor, step_size: float) -> torch.Tensor:
    """(n,) log of the Metropolis-Hastings ratio for the move x -> y:
    log pi(y) - log pi(x) + log q(x | y) - log q(y | x)."""
    with torch.no_grad():
        lx, ly = target.log_prob(x), target.log_prob(y)
    gx, gy = target.grad_log_prob(x), target.grad_log_prob(y)
    return ly - lx + langevin_log_proposal(x, y, gy, step_size) - langevin_log_proposal(y, x, gx, step_size)


def adapt_step_size(step_size: float, acceptance: float, target: float, factor: float = ADAPT_FACTOR) -> float:
    """gfn-diffusion's schedule: grow the step by (1 + factor) when the acceptance is above the target, else shrink it
    by (1 - factor)."""
    return step_size * (1 + factor) if acceptance > target else step_size * (1 - factor)


def local_search(target: Target, x: torch.Tensor, steps: int, step_size: float, generator: torch.Generator,
                 metropolis: bool = True, target_acceptance: float | None = None, burn_in: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`steps` Langevin steps from each row of x (n, d) on log pi = target.log_prob. Returns the final x (n, d), its
    log pi (n,), and the fraction of proposals accepted (1.0 without Metropolis). With burn_in (MALA only), the
    first two are instead every proposal accepted in steps burn_in + 1 .. steps (m, d) and (m,), in step order, the
    rows of one step in chain order (gfn-diffusion's langevin.py).

    Proposal (Euler-Maruyama step of dx = grad log pi dt + sqrt(2) dW, step eta):
        y = x + eta grad log pi(x) + sqrt(2 eta) z,   z ~ N(0, I).
    metropolis=True (MALA, the default, as gfn-diffusion's langevin.py): accept y with probability
    min(1, pi(y) q(x|y) / (pi(x) q(y|x))), which leaves pi invariant for any eta. A proposal whose log pi or gradient
    is not finite is rejected. metropolis=False (ULA) always moves, so its stationary law is biased by O(eta): on
    N(m, s^2) its variance is s^2 / (1 - eta / 2s^2). Its non-finite rows are returned as they are, and
    ReplayBuffer.add drops them.
    target_acceptance (MALA only; Sendera et al. use 0.574): after each step, eta is multiplied by 1.01 if that step's
    acceptance over the batch was above the target, else by 0.99. None keeps eta fixed.
    Noise comes from `generator` alone (on x's device): n d normals, then n uniforms, per step.
    """
    _int("steps", steps, 1)
    generator = _generator(generator)
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0 < step_size < math.inf:
        raise ValueError(f"local search: 'step_size' = {step_size!r}; must be a number > 0")
    if target_acceptance is not None:
        if not metropolis:
            raise ValueError("local search: 'target_acceptance' adapts MALA's step; ULA (metropolis=False) accepts "
                             "every proposal, so it has nothing to adapt to")
        if isinstance(target_acceptance, bool) or not isinstance(target_acceptance, (int, float)) \
                or not 0 < target_acceptance < 1:
            raise ValueError(f"local search: 'target_acceptance' = {target_acceptance!r}; must be in (0, 1) or None")
    if burn_in is not None:
        if not metropolis:
            raise ValueError("local search: 'burn_in' collects MALA's accepted proposals; ULA (metropolis=False) "
                             "has no acceptance")
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or not 0 <= burn_in < steps:
            raise ValueError(f"local search: 'burn_in' = {burn_in!r}; must be an integer in [0, steps = {steps})")
    if x.ndim != 2 or x.shape[1] != target.dim:
        raise ValueError(f"local search on target {target.name!r}: x has shape {tuple(x.shape)}; "
                         f"expected (n, {target.dim})")
    eta, n = float(step_size), x.shape[0]
    kept_x, kept_lp = [], []
    x = x.detach().clone()
    g = target.grad_log_prob(x)
    with torch.no_grad():
        lp = target.log_prob(x) if metropolis else None
        accepted = 0
        for i in range(steps):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            y = x + eta * g + math.sqrt(2 * eta) * z
            gy = target.grad_log_prob(y)
            if not metropolis:
                x, g = y, gy
                continue
            ly = target.log_prob(y)
            log_alpha = ly - lp + langevin_log_proposal(x, y, gy, eta) - langevin_log_proposal(y, x, g, eta)
            u = torch.rand(n, generator=generator, dtype=x.dtype, device=x.device)
            ok = (torch.log(u) < log_alpha) & torch.isfinite(ly) & torch.isfinite(gy).all(1)   # NaN ratio: reject
            x, g, lp = torch.where(ok[:, None], y, x), torch.where(ok[:, None], gy, g), torch.where(ok, ly, lp)
            if burn_in is not None and i >= burn_in:
                kept_x.append(y[ok])
                kept_lp.append(ly[ok])
            a = int(ok.sum())
            accepted += a
            if target_acceptance is not None:
                eta = adapt_step_size(eta, a / max(n, 1), target_acceptance)
        if not metropolis:
            return x, target.log_prob(x), 1.0
    if burn_in is not None:
        x, lp = torch.cat(kept_x), torch.cat(kept_lp)
    return x, lp, accepted / max(steps * n, 1)

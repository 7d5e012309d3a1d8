"""Replay buffer and Langevin local search (trainer/density/buffer.py) against analytic answers.

Buffer: the rank-prioritised law P(i) = w_i / sum w, w_i = 1/(k N + rank_i), checked by frequencies within 5 binomial
sigmas. MALA on pi = N(m, s^2 I): the MH ratio of the Langevin proposal has the closed form
    log alpha(x -> y) = -eta (|y - m|^2 - |x - m|^2) / (4 s^4)
(expand log pi(y) - log pi(x) + log q(x|y) - log q(y|x) with q(y|x) = N(y; m + a (x - m), 2 eta), a = 1 - eta/s^2).
MALA leaves pi invariant at any eta. ULA's chain v' = a v + sqrt(2 eta) z settles at variance
2 eta / (1 - a^2) = s^2 / (1 - eta / 2s^2) instead, which is 4/3 s^2 at eta = s^2 / 2.
"""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch

from conftest import run_two_ranks
from trainer.checkpoint import CheckpointManager
from trainer.density.buffer import (ReplayBuffer, adapt_step_size, langevin_log_proposal, local_search,
                                    mala_log_acceptance)
from trainer.density.targets import Gaussian, Target

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def filled(capacity=64, n=50, dim=3, seed=0, rank=0, world=1, **kw) -> ReplayBuffer:
    b = ReplayBuffer(capacity, dim, rank, world, dtype=F64, **kw)
    g = gen(seed)
    b.add(torch.randn(n, dim, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64))
    return b


def held(b: ReplayBuffer) -> list[float]:
    return sorted(b.log_reward[:len(b)].tolist())


# ---- buffer: capacity, eviction, non-finite rows ------------------------------------------------------------------
def test_fifo_eviction_keeps_the_newest_rows_up_to_capacity():
    b = ReplayBuffer(6, 2, 0, 1, dtype=F64)
    assert b.eviction == "fifo" and b.prioritization == "rank" and b.rank_k == 0.01
    r = torch.arange(20, dtype=F64)
    b.add(r[:4, None].expand(4, 2), r[:4])
    assert len(b) == 4 and held(b) == [0, 1, 2, 3]
    b.add(r[4:9, None].expand(5, 2), r[4:9])
    assert len(b) == 6 and held(b) == [3, 4, 5, 6, 7, 8] and b.added == 9
    b.add(r[9:19, None].expand(10, 2), r[9:19])                       # more than the capacity at once
    assert held(b) == list(range(13, 19))
    assert torch.equal(b.x[:6, 0], b.log_reward[:6])                  # rows stay whole


def test_reward_eviction_keeps_the_highest_log_rewards_ever_added():
    b = ReplayBuffer(8, 1, 0, 1, eviction="reward", dtype=F64)
    g, seen = gen(1), []
    for m in (5, 7, 1, 12, 3):
        lr = torch.randn(m, generator=g, dtype=F64)
        seen += lr.tolist()
        b.add(lr[:, None], lr)
        assert held(b) == sorted(seen)[-8:]
    assert torch.equal(b.x[:8, 0], b.log_reward[:8])
    ties = ReplayBuffer(3, 1, 0, 1, eviction="reward", dtype=F64)     # among equal rewards the oldest go first
    ties.add(torch.tensor([[0.0], [1.0], [2.0]], dtype=F64), torch.zeros(3, dtype=F64))
    ties.add(torch.tensor([[3.0]], dtype=F64), torch.zeros(1, dtype=F64))
    assert sorted(ties.x[:3, 0].tolist()) == [1.0, 2.0, 3.0]


def test_shards_hold_capacity_over_world_size_and_bad_arguments_are_named():
    assert [ReplayBuffer(10, 2, r, 3).capacity for r in range(3)] == [3, 3, 3]
    for kw, word in [(dict(capacity=2, world_size=3), "capacity"), (dict(rank=3), "rank"),
                     (dict(prioritization="reward"), "prioritization"), (dict(eviction="lifo"), "eviction"),
                     (dict(dim=0), "dim"), (dict(rank_k=0.0), "rank_k")]:
        args = dict(capacity=10, dim=2, rank=0, world_size=3) | kw
        with pytest.raises(ValueError, match=word):
            ReplayBuffer(**args)
    b = ReplayBuffer(10, 2, 0, 1)
    with pytest.raises(ValueError, match="empty"):
        b.sample(1, gen(0))
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        b.add(torch.zeros(3, 3), torch.zeros(3))
    b.add(torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(ValueError, match="torch.Generator"):
        b.sample(1, None)


def test_non_finite_rows_never_enter_and_are_counted():
    b = ReplayBuffer(5, 2, 0, 1, eviction="reward")                    # float32 storage
    x = torch.zeros(8, 2, dtype=F64)
    lr = torch.arange(8, dtype=F64)
    lr[1], lr[2], lr[3] = math.nan, math.inf, -math.inf
    x[4, 0], x[5, 1] = math.nan, -math.inf
    x[6, 0] = 1e300                                                     # finite in float64, inf in float32
    assert b.add(x, lr) == 6 and b.dropped == 6 and len(b) == 2 and b.added == 2
    assert held(b) == [0.0, 7.0]
    for _ in range(3):                                                  # through the eviction path too
        lr = torch.randn(6, dtype=F64)
        lr[0] = math.nan
        assert b.add(torch.randn(6, 2, dtype=F64), lr) == 1
    assert b.dropped == 9 and len(b) == 5
    assert torch.isfinite(b.x[:5]).all() and torch.isfinite(b.log_reward[:5]).all()
    xs, ls = b.sample(1000, gen(0))
    assert torch.isfinite(xs).all() and torch.isfinite(ls).all()


# ---- buffer: the sampling law ---------------------------------------------------------------------------------------
def _frequencies_match(b: ReplayBuffer, p: torch.Tensor, draws: int, seed: int) -> None:
    x, lr = b.sample(draws, gen(seed))
    slot = {v: i for i, v in enumerate(b.log_reward[:len(b)].tolist())}          # distinct rewards name the slots
    counts = torch.bincount(torch.tensor([slot[v] for v in lr.tolist()]), minlength=len(b)).to(F64)
    assert torch.equal(x[:, 0], lr)                                               # x and log_reward from one row
    sd = (draws * p * (1 - p)).sqrt()
    z = (counts - draws * p) / sd
    assert z.abs().max() < 5, z


def test_rank_prioritised_sampling_frequencies_match_one_over_kN_plus_rank():
    N, k, draws = 40, 0.01, 200_000
    b = ReplayBuffer(64, 1, 0, 1, dtype=F64)
    rewards = torch.randperm(N, generator=gen(3)).to(F64) * 0.37 - 5              # distinct, shuffled
    b.add(rewards[:, None], rewards)
    rank = torch.argsort(torch.argsort(rewards, descending=True))                 # 0 = highest reward
    w = 1.0 / (k * N + rank.to(F64))
    p = w / w.sum()
    assert torch.allclose(b.probabilities(), p, rtol=1e-12, atol=0)
    assert p.max() / p.min() == pytest.approx((k * N + N - 1) / (k * N))          # 98.5: best vs worst
    _frequencies_match(b, p, draws, seed=4)
    u = ReplayBuffer(64, 1, 0, 1, prioritization="uniform", dtype=F64)
    u.add(rewards[:, None], rewards)
    _frequencies_match(u, torch.full((N,), 1 / N, dtype=F64), draws, seed=5)


def test_sampling_uses_the_given_generator_only():
    b = filled()
    torch.manual_seed(0)
    a = b.sample(100, gen(7))
    torch.manual_seed(1)                                                          # the global RNG plays no part
    assert all(torch.equal(s, t) for s, t in zip(a, b.sample(100, gen(7))))
    assert not torch.equal(a[1], b.sample(100, gen(8))[1])


# ---- buffer: checkpoint state ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("eviction", ["fifo", "reward"])
def test_state_dict_round_trip_restores_exactly_and_sampling_continues_identically(eviction):
    b = filled(capacity=32, n=50, eviction=eviction)                              # full, with evictions
    b.add(torch.full((2, 3), math.nan, dtype=F64), torch.zeros(2, dtype=F64))
    state = b.state_dict()
    assert list(state) == ["rank0"] and b.per_rank_keys() == ["rank0"]
    b2 = ReplayBuffer(32, 3, 0, 1, eviction=eviction, dtype=F64)
    b2.load_state_dict(state)
    assert (len(b2), b2.added, b2.dropped) == (len(b), b.added, b.dropped) == (32, 50, 2)
    for name in ("x", "log_reward", "order"):
        assert torch.equal(getattr(b2, name), getattr(b, name))
    g, g2 = gen(11), gen(11)
    for _ in range(3):
        assert all(torch.equal(s, t) for s, t in zip(b.sample(64, g), b2.sample(64, g2)))
    new = torch.randn(20, 3, generator=gen(12), dtype=F64)
    b.add(new, new[:, 0])
    b2.add(new, new[:, 0])
    assert torch.equal(b.x, b2.x) and torch.equal(b.order, b2.order)
    b.load_state_dict(state)                                                      # the state is a snapshot
    assert b.added == 50 and torch.equal(b.x, state["rank0"]["x"])


def test_per_rank_keys_each_rank_loads_its_own_shard(caplog):
    shards = [filled(capacity=30, n=12, seed=r, rank=r, world=3) for r in range(3)]
    assert [s.per_rank_keys() for s in shards] == [["rank0"], ["rank1"], ["rank2"]]
    merged = {k: v for s in shards for k, v in s.state_dict().items()}            # what the checkpoint holds
    for r in range(3):
        fresh = ReplayBuffer(30, 3, r, 3, dtype=F64)
        fresh.load_state_dict(merged)
        assert torch.equal(fresh.x, shards[r].x) and len(fresh) == 10
    grown = ReplayBuffer(40, 3, 3, 4, dtype=F64)                                  # a rank the checkpoint never had
    with caplog.at_level(logging.WARNING, logger="fieldtrain"):
        grown.load_state_dict(merged)
    assert len(grown) == 0 and "no replay buffer shard for rank 3" in caplog.text
    with pytest.raises(ValueError, match=r"capacity // world_size"):
        ReplayBuffer(60, 3, 0, 3, dtype=F64).load_state_dict(merged)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_checkpoint_round_trip_one_rank(tmp_path):
    b = filled(capacity=40, n=55)
    manager = CheckpointManager(tmp_path / "checkpoints")
    manager.save(1, {"buffer": b})
    b2 = ReplayBuffer(40, 3, 0, 1, dtype=F64)
    manager.load({"buffer": b2})
    assert torch.equal(b2.x, b.x) and (len(b2), b2.added) == (40, 55)
    assert all(torch.equal(s, t) for s, t in zip(b.sample(16, gen(2)), b2.sample(16, gen(2))))


def _two_rank_worker(rank: int, port: int, root: str) -> None:
    import datetime

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    b = filled(capacity=40, n=25 + rank, seed=100 + rank, rank=rank, world=2)
    manager = CheckpointManager(os.path.join(root, "checkpoints"))
    path = manager.save(3, {"buffer": b})
    fresh = ReplayBuffer(40, 3, rank, 2, dtype=F64)
    manager.load({"buffer": fresh})
    keys = sorted(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    same = torch.equal(fresh.x, b.x) and torch.equal(fresh.order, b.order) and len(fresh) == len(b) == 20
    same = same and all(torch.equal(s, t) for s, t in zip(b.sample(8, gen(1)), fresh.sample(8, gen(1))))
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump({"same": same, "added": fresh.added, "keys": keys}, f)
    from launch.rendezvous import destroy_distributed
    destroy_distributed()


def test_dcp_checkpoint_keeps_every_ranks_shard(tmp_path):
    run_two_ranks(_two_rank_worker, (str(tmp_path),), "fork", 120, "saving or loading the replay buffer")
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["same"] and r["added"] == 25 + rank, r
        assert {f"buffer.rank{q}.{name}" for q in (0, 1) for name in ("x", "log_reward", "order")} <= set(r["keys"])


# ---- local search: MALA on a Gaussian -------------------------------------------------------------------------------
M, S = [1.0, -2.0], 0.5


def gaussian() -> Gaussian:
    return Gaussian(mu=M, std=S, dim=2)


def assert_moments(x: torch.Tensor, var: float, what: str) -> None:
    """Mean m and variance `var` per coordinate, within 5 sigma for n independent draws of a normal."""
    n = x.shape[0]
    mean_z = (x.mean(0) - torch.tensor(M, dtype=x.dtype)) / math.sqrt(var / n)
    var_z = (x.var(0) - var) / (var * math.sqrt(2 / (n - 1)))
    assert mean_z.abs().max() < 5 and var_z.abs().max() < 5, (what, mean_z, var_z)


def test_mala_leaves_the_gaussian_invariant_and_ula_does_not():
    t, eta, n = gaussian(), 0.5 * S**2, 20_000
    x0 = t.sample(n, gen(1), dtype=F64)
    x, lp, acc = local_search(t, x0, steps=50, step_size=eta, generator=gen(2))
    assert_moments(x, S**2, "MALA")
    assert 0 < acc <= 1 and 0.5 < acc < 1                       # a real test: many moves are rejected
    assert torch.allclose(lp, t.log_prob(x), rtol=0, atol=1e-12)
    xu, lpu, accu = local_search(t, x0, steps=50, step_size=eta, generator=gen(2), metropolis=False)
    assert accu == 1.0 and torch.allclose(lpu, t.log_prob(xu), rtol=0, atol=1e-12)
    ula_var = S**2 / (1 - eta / (2 * S**2))                    # 4/3 s^2
    assert_moments(xu, ula_var, "ULA")
    assert ((xu.var(0) - S**2) / (S**2 * math.sqrt(2 / (n - 1)))).min() > 20   # ULA's bias is far outside MC noise


def test_mala_from_a_bad_start_converges_to_the_target_moments():
    t, n = gaussian(), 4000
    x0 = torch.tensor(M, dtype=F64) + 8 * S                     # all chains at one point, 11 sigma out
    x, _, acc = local_search(t, x0.expand(n, 2), steps=200, step_size=0.4 * S**2, generator=gen(3))
    assert_moments(x, S**2, "MALA from a bad start")
    assert 0 < acc <= 1


def test_mh_ratio_matches_the_direct_computation_and_the_closed_form():
    t, m, s = gaussian(), torch.tensor(M, dtype=F64), S
    g = gen(4)
    x = m + 2 * torch.randn(6, 2, generator=g, dtype=F64)
    y = m + 2 * torch.randn(6, 2, generator=g, dtype=F64)
    for eta in (0.01, 0.125, 0.3):
        got = mala_log_acceptance(t, x, y, eta)
        q = lambda to, frm: torch.distributions.Normal(frm + eta * t.grad_log_prob(frm),  # noqa: E731
                                                       math.sqrt(2 * eta)).log_prob(to).sum(1)
        direct = t.log_prob(y) - t.log_prob(x) + q(x, y) - q(y, x)
        closed = -eta * ((y - m).pow(2).sum(1) - (x - m).pow(2).sum(1)) / (4 * s**4)
        assert torch.allclose(got, direct, rtol=1e-12, atol=1e-12)
        assert torch.allclose(got, closed, rtol=1e-12, atol=1e-12)
        # the proposal density without its constant differs from the full one by that constant only
        c = langevin_log_proposal(y, x, t.grad_log_prob(x), eta) - q(y, x)
        assert torch.allclose(c, c[:1].expand(6), rtol=0, atol=1e-12)


def test_one_step_accepts_exactly_where_u_is_below_the_ratio():
    t, eta, n = gaussian(), 0.3, 500
    x0 = torch.tensor(M, dtype=F64) + torch.randn(n, 2, generator=gen(5), dtype=F64)
    x1, _, acc = local_search(t, x0, steps=1, step_size=eta, generator=gen(6))
    g = gen(6)                                                  # replay the step's draws: n*d normals, n uniforms
    y = x0 + eta * t.grad_log_prob(x0) + math.sqrt(2 * eta) * torch.randn(n, 2, generator=g, dtype=F64)
    u = torch.rand(n, generator=g, dtype=F64)
    ok = u.log() < mala_log_acceptance(t, x0, y, eta)
    assert torch.equal(x1, torch.where(ok[:, None], y, x0)) and acc == ok.double().mean().item()
    assert 0 < acc < 1


class _HalfGaussian(Target):
    """N(0, 1) restricted to x < 0 (log density -inf beyond): a proposal out of the support must be rejected."""
    name, dim = "half_gaussian", 1

    def log_prob(self, x):
        return torch.where(x[:, 0] < 0, -0.5 * x[:, 0] ** 2, -math.inf)

    def grad_log_prob(self, x):
        return -x


def test_mala_never_leaves_the_support_and_ula_may():
    x0 = -torch.rand(2000, 1, generator=gen(7), dtype=F64)
    x, lp, acc = local_search(_HalfGaussian(), x0, steps=20, step_size=0.5, generator=gen(8))
    assert (x < 0).all() and torch.isfinite(lp).all() and 0 < acc < 1
    xu, lpu, _ = local_search(_HalfGaussian(), x0, steps=20, step_size=0.5, generator=gen(8), metropolis=False)
    assert (xu >= 0).any() and torch.isinf(lpu).any()          # ReplayBuffer.add would drop those rows
    b = ReplayBuffer(4000, 1, 0, 1, dtype=F64)
    assert b.add(xu, lpu) == int(torch.isinf(lpu).sum())


def test_step_size_adaptation_moves_the_acceptance_towards_the_target():
    assert adapt_step_size(1.0, 0.9, 0.574) == pytest.approx(1.01)
    assert adapt_step_size(1.0, 0.2, 0.574) == pytest.approx(0.99)
    t = Gaussian(mu=0.0, std=1.0, dim=10)
    x0 = t.sample(500, gen(9), dtype=F64)
    for eta in (0.15, 3.0):                                      # too small (acceptance ~0.9), too large (~0)
        _, _, fixed = local_search(t, x0, steps=300, step_size=eta, generator=gen(10))
        _, _, adapted = local_search(t, x0, steps=300, step_size=eta, generator=gen(10), target_acceptance=0.574)
        assert abs(adapted - 0.574) < 0.5 * abs(fixed - 0.574), (eta, fixed, adapted)
    with pytest.raises(ValueError, match="ULA"):
        local_search(t, x0, steps=1, step_size=0.1, generator=gen(0), metropolis=False, target_acceptance=0.5)
    with pytest.raises(ValueError, match="steps"):
        local_search(t, x0, steps=0, step_size=0.1, generator=gen(0))
    with pytest.raises(ValueError, match="step_size"):
        local_search(t, x0, steps=1, step_size=-1.0, generator=gen(0))
    with pytest.raises(ValueError, match=r"\(n, 10\)"):
        local_search(t, x0[:, :3], steps=1, step_size=0.1, generator=gen(0))


def test_burn_in_collects_exactly_the_proposals_accepted_after_it():
    """gfn-diffusion's local search keeps every proposal accepted after burn-in, not each chain's end. The draws do not
    depend on burn_in, so a run can be replayed step by step: step k's accepted proposals are the rows that changed
    from the chain after k - 1 steps to the chain after k."""
    t, eta, n, steps = gaussian(), 0.3, 200, 6
    x0 = torch.tensor(M, dtype=F64) + 2 * torch.randn(n, 2, generator=gen(11), dtype=F64)
    chain = [x0] + [local_search(t, x0, steps=k, step_size=eta, generator=gen(12))[0] for k in range(1, steps + 1)]
    for burn_in in (0, 2, steps - 1):
        x, lp, acc = local_search(t, x0, steps=steps, step_size=eta, generator=gen(12), burn_in=burn_in)
        moved = [chain[k][(chain[k] != chain[k - 1]).any(1)] for k in range(burn_in + 1, steps + 1)]
        assert torch.equal(x, torch.cat(moved)), burn_in
        assert torch.allclose(lp, t.log_prob(x), rtol=0, atol=1e-12)
    x, _, acc = local_search(t, x0, steps=steps, step_size=eta, generator=gen(12), burn_in=0)
    assert len(x) == round(acc * steps * n) and 0 < acc < 1     # with burn_in 0, every accepted proposal
    for bad in (steps, -1, 1.5):
        with pytest.raises(ValueError, match="burn_in"):
            local_search(t, x0, steps=steps, step_size=eta, generator=gen(0), burn_in=bad)
    with pytest.raises(ValueError, match="burn_in"):
        local_search(t, x0, steps=steps, step_size=eta, generator=gen(0), burn_in=1, metropolis=False)


def test_cached_ranking_follows_every_change():
    """The ranking is kept between draws; after an add, an eviction or a load the draws are those of a buffer built
    fresh from the same rows."""
    b = filled(capacity=64, n=50)
    b.sample(10, gen(1))                                            # the ranking is now cached
    extra = torch.randn(30, 3, generator=gen(2), dtype=F64), torch.randn(30, generator=gen(3), dtype=F64) + 3
    b.add(*extra)                                                   # 80 rows into 64: 16 evicted
    fresh = filled(capacity=64, n=50)
    fresh.add(*extra)
    for a, c in zip(b.sample(200, gen(4)), fresh.sample(200, gen(4))):
        assert torch.equal(a, c)
    other = filled(capacity=64, n=64, seed=9)
    other.sample(10, gen(5))
    other.load_state_dict(b.state_dict())
    for a, c in zip(other.sample(200, gen(6)), fresh.sample(200, gen(6))):
        assert torch.equal(a, c)

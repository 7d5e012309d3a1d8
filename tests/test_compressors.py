"""Compressors on W ranks simulated by threads: agreement across ranks, exactness, error-feedback
bookkeeping, unbiasedness, transactional state, and convergence of error feedback."""

import math

import pytest
import torch
from thread_transport import ThreadGroup, run_ranks

from trainer.compress import COMPRESSORS
from trainer.compress.base import ParamView
from trainer.compress.base import bucket_state
from trainer.config import CommConfig, PowerSGDOptions, QuantOptions, RandKOptions, TopKOptions

# A bucket like an FNO's: a linear weight (compressed by PowerSGD), its bias, a complex spectral weight
# and a conv weight small enough to go uncompressed.
SPEC = [("lin.weight", (24, 40), False), ("lin.bias", (24,), False), ("odd.weight", (9, 35), False),
        ("spec.weight", (12, 12, 6, 4), True), ("conv.weight", (16, 12, 1, 1), False)]

VARIANTS = {
    "none": ("none", {}), "fp16": ("fp16", {}), "bf16": ("bf16", {}), "powersgd": ("powersgd", {"powersgd_complex": "real_view"}),
    "powersgd_complex": ("powersgd", {"powersgd_complex": "complex"}),
    "powersgd_r1": ("powersgd", {"rank": 1}),   # odd-sized P/Q ahead of complex ones in one flat buffer
    "powersgd_bf16q": ("powersgd", {"q_wire": "bfloat16"}),
    "powersgd_balanced": ("powersgd", {"powersgd_view": "balanced"}),
    "powersgd_balanced_real": ("powersgd", {"powersgd_view": "balanced", "powersgd_complex": "real_view"}),
    "powersgd_bf16pq": ("powersgd", {"powersgd_view": "balanced", "p_wire": "bfloat16", "q_wire": "bfloat16"}),
    "powersgd_bf16mm": ("powersgd", {"powersgd_view": "balanced", "p_wire": "bfloat16", "q_wire": "bfloat16",
                                     "compute": "bfloat16"}),
    "powersgd_bf16mm_first": ("powersgd", {"compute": "bfloat16"}),    # complex, in place in the bucket
    "topk": ("topk", {}),
    "randk": ("randk", {}), "randk_unbiased": ("randk", {"randk_unbiased": True}),
    "int8": ("int8", {}), "int4": ("int4", {}), "sign": ("sign", {}),
}


def make_views(spec=SPEC) -> tuple[list[ParamView], int]:
    views, offset = [], 0
    for name, shape, cplx in spec:
        n = math.prod(shape) * (2 if cplx else 1)
        views.append(ParamView(name, offset, n, shape, cplx))
        offset += n
    return views, offset


def comm_config(density=0.1, block_size=64, rank=4, powersgd_complex="complex", min_compression_rate=2.0,
                randk_unbiased=False, q_wire="float32", powersgd_view="first", p_wire="float32",
                compute="float32", **rest) -> CommConfig:
    """A CommConfig from the settings these tests vary, placed in their compressors' tables."""
    return CommConfig(**rest, powersgd=PowerSGDOptions(rank, powersgd_complex, min_compression_rate, q_wire,
                                                       powersgd_view, p_wire, compute),
                      topk=TopKOptions(density), randk=RandKOptions(density, randk_unbiased),
                      int8=QuantOptions(block_size), int4=QuantOptions(block_size))


def build(variant: str, transport, **overrides):
    name, kw = VARIANTS[variant]
    comp = COMPRESSORS[name](comm_config(**{**kw, **overrides}), transport)
    comp.seed = 0
    return comp


def rank_grad(rank: int, n: int, step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(n, generator=g) * (1 + rank)


def run_steps(world, variant, steps, grad=rank_grad, views=None, **overrides):
    """Each rank runs `steps` committed exchanges; returns per rank (outputs, compressor, bytes sent)."""
    views, n = views or make_views()

    def fn(rank, transport):
        comp, outs, sent = build(variant, transport, **overrides), [], []
        for s in range(steps):
            before = transport.payload_bytes
            out = comp.exchange(grad(rank, n, s), views)
            comp.commit()
            outs.append(out.clone())
            sent.append(transport.payload_bytes - before)
        return outs, comp, sent
    return run_ranks(world, fn)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_identical_on_every_rank(variant, world):
    """Bit-identical outputs on every rank (replicas must not drift), pointing the right way, for fewer
    bytes than fp32 allreduce (and the same bytes on every rank: equal-size collectives)."""
    views, n = make_views()
    results = run_steps(world, variant, 3)
    for step in range(3):
        outs = [r[0][step] for r in results]
        assert outs[0].shape == (n,) and torch.isfinite(outs[0]).all()
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
        true = sum(rank_grad(r, n, step) for r in range(world)) / world
        assert torch.cosine_similarity(outs[0], true, dim=0) > 0.15       # rand-k at density 0.1: ~0.2
        sent = {r[2][step] for r in results}
        assert len(sent) == 1 and 0 < sent.pop() < (4 * n if variant != "none" else 4 * n + 1)
    if variant in ("none", "fp16"):
        true = sum(rank_grad(r, n, 2) for r in range(world)) / world
        torch.testing.assert_close(outs[0], true, atol=1e-2 if variant == "fp16" else 1e-6, rtol=1e-3)
    if variant == "bf16":   # W roundings to 8 significant bits (the cast of x_i / W, then each of the W - 1 sums)
        grads = [rank_grad(r, n, 2) / world for r in range(world)]
        bound = world * 2.0 ** -8 * sum(g.abs() for g in grads)   # 2^-8: rounding to nearest with 8 significant bits
        assert ((outs[0] - sum(grads)).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("mode,complex_rank,exact,q_wire", [("complex", 4, True, "float32"),
                                                             ("real_view", 2, True, "float32"),
                                                             ("real_view", 4, False, "float32"),
                                                             ("complex", 4, True, "bfloat16"),
                                                             ("real_view", 2, True, "bfloat16")])
def test_powersgd_exact_on_low_rank_mean(mode, complex_rank, exact, q_wire):
    """Each rank's gradient is A B_j^H (shared column space; the mean has complex rank `complex_rank`).
    With r = 4 both modes are exact for complex rank 4 in "complex" mode and complex rank 2 in
    "real_view" (where it is real rank 4); complex rank 4 in real_view (real rank 8) cannot be.
    With Q sent as bfloat16, "exact" means Q's roundings only: each rank's Q^H and their sum rounded to 8 significant
    bits (2^-8 relative each, so <= 3 2^-8 for 2 ranks) times the orthonormal P, which keeps norms; not below
    2^-12, which would mean nothing was rounded."""
    spec = [("spec.weight", (16, 8, 6, 4), True), ("lin.weight", (24, 40), False)]
    views, n = make_views(spec)
    g = torch.Generator().manual_seed(7)
    A = torch.randn(16, complex_rank, dtype=torch.complex64, generator=g)
    L = torch.randn(24, 4, generator=g)

    def grad(rank, n, step):
        g = torch.Generator().manual_seed(rank)
        spec_w = A @ torch.randn(complex_rank, 8 * 6 * 4, dtype=torch.complex64, generator=g)
        lin_w = L @ torch.randn(4, 40, generator=g)
        return torch.cat([torch.view_as_real(spec_w).reshape(-1), lin_w.reshape(-1)])

    results = run_steps(2, "powersgd", 2, grad=grad, views=(views, n), powersgd_complex=mode, rank=4, q_wire=q_wire)
    true = (grad(0, n, 0) + grad(1, n, 0)) / 2
    low, high = (2.0**-12, 3 * 2.0**-8) if q_wire == "bfloat16" else (0.0, 1e-5)
    for step in range(2):
        out = results[0][0][step]
        errs = [(v.slice(out) - v.slice(true)).norm() / v.slice(true).norm() for v in views]
        assert low <= errs[1] <= high, f"step {step}: lin.weight's relative error {errs[1]:.2e}"
        assert (low <= errs[0] <= high) if exact else (errs[0] > 1e-2), f"step {step}: relative error {errs[0]:.2e}"


@pytest.mark.parametrize("mode", ["complex", "real_view"])
def test_powersgd_balanced_view_exact_where_the_first_dim_view_is_not(mode):
    """A (12, 12, 6, 4) complex gradient whose mean is complex rank 2 as the (in kx, out ky) = (72, 48) matrix the
    balanced view picks (12 x 6 + 12 x 4 = 120 floats per rank, the fewest), but full rank 12 as (in, out kx ky).
    Rank 4 (real_view: real rank 4 = complex rank 2) recovers it exactly in the balanced view and cannot in the
    first-dim one. A 3-float bias first puts the complex weight at an odd offset (no complex view of the bucket)."""
    from trainer.compress.powersgd import matrix_axes
    shape = (12, 12, 6, 4)
    assert matrix_axes(shape, "balanced") == ((0, 2, 1, 3), 2) and matrix_axes(shape, "first") == ((0, 1, 2, 3), 1)
    views, n = make_views([("b", (3,), False), ("spec.weight", shape, True), ("lin.weight", (24, 40), False)])
    A = torch.randn(72, 2, dtype=torch.complex64, generator=torch.Generator().manual_seed(5))

    def grad(rank, n, step):
        g = torch.Generator().manual_seed(100 * rank + step)
        M = A @ torch.randn(2, 48, dtype=torch.complex64, generator=g)            # rows (i, kx), columns (o, ky)
        w = M.view(12, 6, 12, 4).permute(0, 2, 1, 3)                               # back to (in, out, kx, ky)
        return torch.cat([torch.randn(3, generator=g), torch.view_as_real(w.contiguous()).reshape(-1),
                          torch.randn(24 * 40, generator=g)])

    true = (grad(0, n, 1) + grad(1, n, 1)) / 2
    errs = {}
    for view in ("balanced", "first"):
        outs = run_steps(2, "powersgd", 2, grad=grad, views=(views, n), powersgd_complex=mode, rank=4,
                         powersgd_view=view)
        out = outs[0][0][1]
        assert torch.equal(out, outs[1][0][1])
        spec = views[1]
        errs[view] = ((spec.slice(out) - spec.slice(true)).norm() / spec.slice(true).norm()).item()
        torch.testing.assert_close(views[0].slice(out), views[0].slice(true))     # the bias goes uncompressed
    assert errs["balanced"] < 1e-5 and errs["first"] > 1e-2, errs


def test_powersgd_complex_vs_real_view_error_per_byte(capsys):
    """A (32, 32, 24, 12) complex spectral-weight gradient: complex rank 4 with singular values 1, 1/2,
    1/4, 1/8, plus 10% noise. At equal rank r both modes send the same bytes to 0.2% (real_view r(n + 2m)
    floats, complex 2r(n + m)), but a complex rank-r P Q^H spans what real_view needs rank 2r for."""
    shape, n_rows, m = (32, 32, 24, 12), 32, 32 * 24 * 12
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(n_rows, 4, dtype=torch.complex64, generator=g)).Q
    V = torch.linalg.qr(torch.randn(m, 4, dtype=torch.complex64, generator=g)).Q
    low = U @ torch.diag(torch.tensor([1, 0.5, 0.25, 0.125], dtype=torch.complex64)) @ V.mH
    G = low + 0.1 * low.norm() / math.sqrt(n_rows * m) * torch.randn(n_rows, m, dtype=torch.complex64, generator=g)
    flat = torch.view_as_real(G).reshape(-1).contiguous()
    views = [ParamView("spec", 0, flat.numel(), shape, True)]
    table = {}
    for mode in ("real_view", "complex"):
        for r in (1, 2, 4, 8):
            transport = ThreadGroup(1).transport(0)
            comp = build("powersgd", transport, powersgd_complex=mode, rank=r, error_feedback=False)
            for _ in range(4):                                   # warm-started power iterations
                before = transport.payload_bytes
                out = comp.exchange(flat.clone(), views)
                sent = transport.payload_bytes - before
                comp.commit()
            table[mode, r] = ((out - flat).norm() / flat.norm()).item(), sent
    with capsys.disabled():
        print("\nPowerSGD, complex (32,32,24,12) gradient, rank 4 + 10% noise: relative error, KiB per exchange")
        for r in (1, 2, 4, 8):
            (er, br), (ec, bc) = table["real_view", r], table["complex", r]
            print(f"  r={r}: real_view {er:.4f} {br / 1024:6.1f} KiB   complex {ec:.4f} {bc / 1024:6.1f} KiB")
    for r in (1, 2, 4):
        (er, br), (ec, bc) = table["real_view", r], table["complex", r]
        assert abs(bc - br) < 0.01 * br and ec < 0.9 * er, f"rank {r}"
        assert ec < 1.1 * table["real_view", 2 * r][0]        # about as good as real_view at twice the bytes
    assert table["complex", 4][0] < 0.2                      # rank 4 reaches the noise floor


@pytest.mark.parametrize("variant", ["int8", "int4", "sign"])
def test_error_feedback_conserves_what_was_not_sent(variant):
    """Worker i sends c_i and keeps e_i' = x_i - c_i with x_i = g_i + e_i; server r keeps e_s' = y - out on
    its shard with y = mean_i c_i + e_s. Hence, exactly up to fp32 roundoff:
        mean_i (g_i + e_i) + E_s = out + mean_i e_i' + E_s'   (E_s: the servers' shards concatenated)."""
    world, (views, n) = 4, make_views()

    def residuals(comp):
        worker = bucket_state(comp, views, "/e", torch.zeros(n))
        server = [v for k, v in comp.local.items() if k.startswith("server")]
        return worker, (server[0] if server else None)

    def fn(rank, transport):
        comp, log = build(variant, transport), []
        for s in range(3):
            before = residuals(comp)
            out = comp.exchange(rank_grad(rank, n, s), views)
            comp.commit()
            log.append((before, residuals(comp), out.clone()))
        return log

    logs = run_ranks(world, fn)
    for s in range(3):
        # E_s before (i = 0) and after (i = 1) the step; there is none before the first
        server = [0 if logs[0][s][i][1] is None else torch.cat([logs[r][s][i][1] for r in range(world)])[:n]
                  for i in (0, 1)]
        lhs = sum(rank_grad(r, n, s) + logs[r][s][0][0] for r in range(world)) / world + server[0]
        rhs = logs[0][s][2] + sum(logs[r][s][1][0] for r in range(world)) / world + server[1]
        torch.testing.assert_close(lhs, rhs, atol=1e-5, rtol=1e-5)
        assert logs[0][s][1][0].abs().max() > 0          # something really was held back


@pytest.mark.parametrize("variant", ["topk", "randk"])
def test_ef21_bookkeeping(variant):
    """EF21: g_i' - g_i = C(grad_i - g_i) is k-sparse and equals grad_i - g_i where it is non-zero
    (top-k: on the k largest |grad_i - g_i|); and g == mean_i g_i after every step."""
    world, (views, n) = 3, make_views()
    k = math.ceil(0.1 * n)

    def fn(rank, transport):
        comp, log = build(variant, transport), []
        for s in range(4):
            gi = bucket_state(comp, views, "/g_i", torch.zeros(n))
            grad = rank_grad(rank, n, s)
            out = comp.exchange(grad.clone(), views)
            comp.commit()
            gi_new = bucket_state(comp, views, "/g_i", torch.zeros(n))
            g = bucket_state(comp, views, "/g", torch.zeros(n), local=False)
            log.append((grad - gi, gi_new - gi, gi_new, g, out))
        return log

    logs = run_ranks(world, fn)
    for s in range(4):
        for r in range(world):
            d, c, *_ = logs[r][s]
            support = c != 0
            assert support.sum() <= k and torch.equal(c[support], d[support])
            if variant == "topk":
                assert d[support].abs().min() >= d[~support].abs().max()
        g, out = logs[0][s][3], logs[0][s][4]
        assert torch.equal(g, out)
        torch.testing.assert_close(g, sum(logs[r][s][2] for r in range(world)) / world, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant,kw", [("randk_unbiased", {}), ("int8", {"error_feedback": False}),
                                        ("int4", {"error_feedback": False})])
def test_unbiased_by_monte_carlo(variant, kw):
    views, n = make_views([("w", (20, 30), False)])
    trials = 400
    results = run_steps(2, variant, trials, views=(views, n), grad=lambda r, n, s: rank_grad(r, n), **kw)
    samples = torch.stack(results[0][0])                              # (trials, n)
    true = (rank_grad(0, n) + rank_grad(1, n)) / 2
    se = samples.std(dim=0) / math.sqrt(trials)
    err = samples.mean(dim=0) - true
    assert (err.abs() <= 5 * se + 1e-6).all()                         # per element, within 5 standard errors
    assert err.pow(2).sum() <= 2 * se.pow(2).sum()                    # and in aggregate (expected ratio 1)
    assert samples.std(dim=0).max() > 0                               # it really is random


def test_topk_is_a_contraction():
    """||C(x) - x||^2 <= (1 - k/d) ||x||^2, with equality when all |x_i| are equal."""
    views, n = make_views([("w", (50, 40), False)])
    k = math.ceil(0.1 * n)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g), torch.randn(n, generator=g) ** 3, torch.randn(n, generator=g).sign()]
    for x in xs:
        transport = ThreadGroup(1).transport(0)
        comp = build("topk", transport, error_feedback=False)
        out = comp.exchange(x.clone(), views)
        assert transport.payload_bytes == 8 * k and (out != 0).sum() == k
        assert (out - x).pow(2).sum() <= (1 - k / n) * x.pow(2).sum() * (1 + 1e-6)
    assert (out - x).pow(2).sum() >= (1 - k / n) * x.pow(2).sum() * (1 - 1e-6)


@pytest.mark.parametrize("variant", ["powersgd", "powersgd_complex", "powersgd_bf16pq", "powersgd_bf16mm",
                                     "powersgd_bf16mm_first", "topk", "randk", "int8", "int4", "sign"])
def test_rollback_state_dict_and_world_change(variant):
    views, n = make_views()

    def snapshot(comp):     # a deep copy, so in-place changes to committed state would show
        return {part: {k: v.clone() for k, v in d.items()} for part, d in comp.state_dict().items()}

    def same(a, b):
        flat = lambda s: {(p, k): v for p, d in s.items() for k, v in d.items()}   # noqa: E731
        a, b = flat(a), flat(b)
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def fn(rank, transport):
        comp = build(variant, transport)
        comp.exchange(rank_grad(rank, n, 0), views)
        comp.commit()
        before = snapshot(comp)
        first = comp.exchange(rank_grad(rank, n, 1), views).clone()
        comp.rollback()
        assert same(snapshot(comp), before)
        again = comp.exchange(rank_grad(rank, n, 1), views)   # the redo is deterministic
        assert torch.equal(first, again)
        comp.commit()
        saved = snapshot(comp)

        fresh = build(variant, transport)
        assert fresh.load_state_dict(saved, same_world=True) is None and same(snapshot(fresh), saved)
        a = comp.exchange(rank_grad(rank, n, 2), views)
        b = fresh.exchange(rank_grad(rank, n, 2), views)
        assert torch.equal(a, b)

        other = build(variant, transport)
        message = other.load_state_dict(saved, same_world=False)
        assert isinstance(message, str) and other.local == {}
        if variant in ("topk", "randk"):                             # g = mean g_i: both reset
            assert not any(k.endswith("/g") for k in other.replicated)
        if variant.startswith("powersgd"):                           # the warm start is replicated: kept
            assert any(k.endswith("/q") for k in other.replicated)
        return message
    run_ranks(2, fn)


def shared_direction_grad(rank: int, n: int, step: int = 0) -> torch.Tensor:
    """Every rank's gradient has the same signs, magnitudes uniform in [1, 2] (1 + rank)."""
    signs = torch.randn(n, generator=torch.Generator().manual_seed(5)).sign()
    return signs * (1 + torch.rand(n, generator=torch.Generator().manual_seed(rank))) * (1 + rank)


@pytest.mark.parametrize("variant,steps,grad", [("sign", 200, shared_direction_grad), ("topk", 400, rank_grad),
                                                ("int4", 200, rank_grad), ("powersgd", 400, rank_grad)])
def test_error_feedback_average_converges_on_constant_gradient(variant, steps, grad):
    """Error feedback sends later what it held back: for a constant gradient, sum_t out_t = T mean_i g_i
    - (residuals now - residuals at 0), so the running mean of the outputs tends to the true mean, here
    within 1%; without error feedback sign stays biased. (Scaled sign on Gaussian-magnitude gradients
    gets there far more slowly: its residuals must grow until ||x||_1 / n exceeds max |g|: 7% after 200
    steps, 3.7% after 800.) EF21's output itself becomes exact once every g_i has caught up."""
    views, n = make_views()
    grad = lambda r, n, s, g=grad: g(r, n)                 # noqa: E731 - constant in time
    results = run_steps(2, variant, steps, grad=grad)
    true = (grad(0, n, 0) + grad(1, n, 0)) / 2
    outs = torch.stack(results[0][0])
    assert (outs.mean(dim=0) - true).norm() / true.norm() < 0.01
    if variant == "topk":
        torch.testing.assert_close(outs[-1], true)
    if variant == "sign":
        biased = run_steps(2, variant, 50, grad=grad, error_feedback=False)
        avg = torch.stack(biased[0][0]).mean(dim=0)
        assert (avg - true).norm() / true.norm() > 0.1


@pytest.mark.parametrize("variant", ["powersgd", "powersgd_complex", "powersgd_r1", "powersgd_bf16q",
                                     "powersgd_balanced", "powersgd_balanced_real", "powersgd_bf16pq",
                                     "powersgd_bf16mm"])
def test_powersgd_cost_model_predicts_the_bytes_it_sends(variant):
    """One rule decides what PowerSGD compresses (`powersgd_matrix`): `auto`'s cost model predicts exactly the bytes
    the compressor sends. (16, 16) at rank 4 sits on the rule's edge, r (n + m) * 2 == n m: not compressed, as
    torch's powerSGD_hook decides."""
    from trainer.compress.auto import collectives, powersgd_plan
    spec = [*SPEC, ("edge.weight", (16, 16), False)]
    views, n = make_views(spec)
    _, kw = VARIANTS[variant]
    cfg = comm_config(**kw)
    matrices, n_small = powersgd_plan([(shape, cplx) for _, shape, cplx in spec], cfg)
    predicted = sum(b for _, b in collectives("powersgd", cfg, n, matrices, n_small, 2))
    sent = run_steps(2, variant, 1, views=(views, n))[0][2][0]
    assert sent == predicted
    if cfg.powersgd.rank == 4:   # the edge matrix and the bias go uncompressed
        assert (16, 16) not in [(p // 4, q // 4) for p, q in matrices] and n_small >= 16 * 16 + 24


def _rank2_mean_case():
    """One complex (16, 8, 6, 4) weight whose gradient on rank j is A B_j (A shared, 16 x 2): the mean has complex
    rank 2. Returns (views, n, grad)."""
    views, n = make_views([("spec.weight", (16, 8, 6, 4), True)])
    A = torch.randn(16, 2, dtype=torch.complex64, generator=torch.Generator().manual_seed(7))

    def grad(rank, n, step):
        g = torch.Generator().manual_seed(rank)
        return torch.view_as_real(A @ torch.randn(2, 8 * 6 * 4, dtype=torch.complex64, generator=g)).reshape(-1)
    return views, n, grad


@pytest.mark.parametrize("mode", ["complex", "real_view"])
def test_powersgd_bf16_p_within_its_rounding_bound(mode):
    """P sent as bfloat16 on a mean of rank <= r (exact with fp32 P): every rank orthonormalises the same rounded sum
    P_sum + D, and for M = P_sum X the error (I - U U^H) M = -(I - U U^H) D X, so |error|_F / |M|_F <=
    |D|_F / sigma_k(P_sum) (k the mean's rank) with |D| <= 2^-8 (|P_0| + |P_1| + |P_sum|) entrywise (each rank's product and the sum
    rounded to 8 significant bits). And above 2^-14: something was rounded. Q stays float32 here."""
    from trainer.compress.transport import LocalTransport
    views, n, grad = _rank2_mean_case()

    out = run_steps(2, "powersgd", 1, grad=grad, views=(views, n), powersgd_complex=mode, rank=4,
                    p_wire="bfloat16")[0][0][0]
    true = (grad(0, n, 0) + grad(1, n, 0)) / 2
    comp = build("powersgd", LocalTransport(), powersgd_complex=mode, rank=4)
    rows, cols, _ = comp.matrix_shape(views[0])
    cplx = mode == "complex"
    as_matrix = (lambda x: torch.view_as_complex(x.view(-1, 2)).view(rows, cols)) if cplx else (
        lambda x: x.view(rows, cols))
    Q = comp._warm_q(views[0], cols, 4, cplx, torch.device("cpu")).to(torch.complex128 if cplx else torch.float64)
    P = [as_matrix(grad(r, n, 0)).to(Q.dtype) @ Q for r in range(2)]
    P_sum = P[0] + P[1]
    sv = torch.linalg.svdvals(P_sum)
    sigma = sv[(sv > 1e-4 * sv[0]).sum() - 1]   # the smallest of the mean's rank (2 complex, 4 real): X = P_sum^+ M
    bound = 2.0**-8 * (1 + 2.0**-7) * sum(p.norm() for p in [*P, P_sum]) / sigma
    err = float((out - true).norm() / true.norm())
    assert 2.0**-14 < err <= float(bound), (err, float(bound))


def _bf16_product_error(A: torch.Tensor, B: torch.Tensor, lam: float = 6.0) -> float:
    """A bound on |fl(A B) - A B|_F for kernels.lowrank's bfloat16 products (u = 2^-8; K real terms per entry).
    Input roundings: each entry's error sum_k a_k b_k (d_ak + d_bk), |d| <= u, taken as independent zero-mean terms
    (probabilistic rounding-error analysis, Higham and Mary 2019): by Hoeffding within lam 2u sqrt(sum_k a_k^2 b_k^2)
    but with probability 2 exp(-lam^2 / 2) (2e-8 at lam = 6) per entry. Complex entries: each of re and im is
    bounded by the moduli, so sum_k |a_k|^2 |b_k|^2, counted twice. Float32 accumulation adds at most
    K 2^-24 |A|_F |B|_F (deterministic), and the result's rounding u |AB + that|."""
    u, cplx = 2.0**-8, A.is_complex()
    K = A.shape[1] * (2 if cplx else 1)
    parts = 2 if cplx else 1
    stat = lam * 2 * u * math.sqrt(parts * float((A.abs() ** 2 @ B.abs() ** 2).sum()))
    det = K * 2.0**-24 * math.sqrt(parts) * float(A.norm() * B.norm())
    return stat + det + u * (float((A @ B).norm()) + stat + det)


@pytest.mark.parametrize("mode", ["complex", "real_view"])
def test_powersgd_bf16_products_within_their_rounding_bound(mode):
    """`compute = "bfloat16"` on a mean of rank <= r (exact with float32 products), P and Q float32 on the wire.
    With D the error of P_sum = sum_j M_j Q (`_bf16_product_error` per rank), the projection onto orth(P_sum + D)
    misses at most |D|_F / sigma_k(P_sum) of the mean (as for bf16 P, above); Q^H = U^H mean_j M_j adds the mean of
    the ranks' product errors, and approx = U Q^H its own (U orthonormal keeps both norms): relative error <=
    |D|_F / sigma_k + (|dQ|_F + |dA|_F) (1 + |D|_F / sigma_k) / |M|_F. Above u^2: the products were rounded."""
    from trainer.compress.transport import LocalTransport
    views, n, grad = _rank2_mean_case()

    # the cold-start Q is random: with r = k (real_view's real rank 4 at r = 4) P_sum = M Q is a square Gaussian
    # sketch, conditioned 50x here; r = 2k keeps sigma_k(P_sum) away from 0 (complex: k = 2, r = 4)
    r = 4 if mode == "complex" else 8
    out = run_steps(2, "powersgd", 1, grad=grad, views=(views, n), powersgd_complex=mode, rank=r,
                    min_compression_rate=1.0, compute="bfloat16")[0][0][0]
    true = (grad(0, n, 0) + grad(1, n, 0)) / 2
    comp = build("powersgd", LocalTransport(), powersgd_complex=mode, rank=r, min_compression_rate=1.0)
    rows, cols, cplx = comp.matrix_shape(views[0])
    as_matrix = (lambda x: torch.view_as_complex(x.view(-1, 2)).view(rows, cols)) if cplx else (
        lambda x: x.view(rows, cols))
    Q = comp._warm_q(views[0], cols, r, cplx, torch.device("cpu")).to(torch.complex128 if cplx else torch.float64)
    Ms = [as_matrix(grad(j, n, 0)).to(Q.dtype) for j in range(2)]
    M = (Ms[0] + Ms[1]) / 2
    P_sum = Ms[0] @ Q + Ms[1] @ Q
    sv = torch.linalg.svdvals(P_sum)
    sigma = float(sv[(sv > 1e-4 * sv[0]).sum() - 1])
    U = torch.linalg.qr(P_sum).Q
    tilt = sum(_bf16_product_error(Mj, Q) for Mj in Ms) / sigma
    dQ = sum(_bf16_product_error(U.mH, Mj) for Mj in Ms) / 2
    dA = _bf16_product_error(U, U.mH @ M)
    bound = tilt + (dQ + dA) * (1 + tilt) / float(M.norm())
    err = float((out - true).norm() / true.norm())
    assert 2.0**-16 < err <= bound < 0.75, (err, bound)     # < 1: an approx of 0 would fail it


@pytest.mark.parametrize("shape", [(16, 16), (17, 16), (24, 40), (9, 35), (3, 100), (100, 3), (12, 288), (40,)])
@pytest.mark.parametrize("rank,rate", [(1, 2.0), (4, 2.0), (4, 1.0), (8, 3.0)])
def test_powersgd_rule_is_torchs(shape, rank, rate):
    """torch's powerSGD_hook is the baseline we count bytes for: its compress decision is ours."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    from trainer.compress.powersgd import powersgd_matrix
    cfg = comm_config(rank=rank, min_compression_rate=rate)
    ours = powersgd_matrix(shape, False, cfg)
    if len(shape) < 2:
        assert ours is None
        return
    n, m = shape[0], math.prod(shape[1:])
    assert (ours is not None) == _should_compress(n, m, min(rank, n, m), rate)[0]


def test_auto_candidates_are_only_compressors_with_a_cost_model():
    for bad in ("auto", "skip", "torch_fp16", "torch_powersgd"):
        with pytest.raises(ValueError, match=r"comm\.auto_candidates\[\]' = '" + bad + "'.*'powersgd'"):
            CommConfig(compressor="auto", auto_candidates=["none", bad])
    with pytest.raises(ValueError, match="non-empty list"):
        CommConfig(auto_candidates=[])


@pytest.mark.parametrize("variant", ["none", "fp16", "int8", "int4", "sign", "topk", "randk"])
@pytest.mark.parametrize("world", [2, 4])
def test_each_compressors_cost_model_predicts_the_bytes_it_sends(variant, world):
    """`auto` costs a compressor by its own `collectives` (no table of names in auto.py): the payload bytes it
    predicts are what the compressor hands the transport in one exchange, to the shard padding int8/int4/sign add
    (at most one block, resp. 8 elements, per shard and rank)."""
    from trainer.compress import COMPRESSORS
    from trainer.compress.auto import candidates, gradient_plan
    views, n = make_views()
    name, kw = VARIANTS[variant]
    cfg = comm_config(**kw)
    assert name in candidates() and COMPRESSORS[name].cost_model
    plan = gradient_plan(torch.nn.Module(), cfg)._replace(n=n)
    predicted = sum(b for _, b in COMPRESSORS[name].collectives(cfg, plan, world))
    sent = run_steps(world, variant, 1)[0][2][0]
    slack = {"int8": 2 * world * (64 + 4), "int4": 2 * world * (32 + 4), "sign": 2 * world * 2}.get(name, 0)
    assert abs(sent - predicted) <= slack, (sent, predicted)

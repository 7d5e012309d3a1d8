"""kernels/native.py, the hand-written C codecs: the same bytes as the torch reference on awkward values, with and
without AVX-512, top-k's tie rule and NaN ranking, scatter order, and the build cache and its fallback."""

import logging

import pytest
import torch

from kernels import (decode_blockwise, encode_blockwise, encode_signs, encode_with_residual, kernel_mode,
                     lowrank_product, pack_signs, scatter_dense, sign_residual, topk_select, unpack_signs)
from kernels import fused, native


def _gen(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@pytest.fixture
def native_on(monkeypatch):
    """The C codecs on, whatever an earlier fixture did (compiled_mode's "inductor" switches them off)."""
    monkeypatch.setattr(native, "_lib", [])
    if native.library() is None:
        pytest.skip("no C compiler: the native codecs are not built here")


def _awkward(n: int, seed: int) -> torch.Tensor:
    """Values that probe every branch of the formula: an all-zero block, subnormal blocks (1 / absmax overflows to
    inf, so inv = 0), huge values, signed zeros, exact +-absmax and exact half-way points for nearest rounding."""
    x = torch.randn(n, generator=_gen("cpu", seed)) * torch.logspace(-3, 3, n)
    x[:300] = 0.0
    x[300:600] = 1e-41 * torch.randn(300, generator=_gen("cpu", seed + 1))
    x[600:650] = 3e38
    x[650:700:2] = -0.0
    x[700:900] = torch.arange(-100, 100) + 0.5                             # absmax 99.5; many land on k + 1/2
    return x


@pytest.mark.parametrize("bits,block", [(8, 256), (8, 7), (8, 300), (4, 256), (4, 2), (4, 10000)])
@pytest.mark.parametrize("stochastic", [True, False])
def test_native_codecs_match_reference_bytes(native_on, bits, block, stochastic):
    """Odd and tiny blocks, and int4 blocks longer than the C's 4096-element staging buffer."""
    n = 3 * 10000 + 123
    x = _awkward(n, block)
    results = {}
    for mode in ("compiled", "reference"):
        with kernel_mode(mode):
            codes, s = encode_blockwise(x, bits, block, stochastic=stochastic, generator=_gen("cpu", 3))
            decoded = decode_blockwise(codes, s, n, bits, block)
            packed = pack_signs(x)
            with_residual = encode_with_residual(x, bits, block, stochastic=stochastic, generator=_gen("cpu", 3))
            into = torch.full((n,), float("nan"))
            in_place = x.clone()
            decoded_into = decode_blockwise(codes, s, n, bits, block, out=torch.full((n,), float("nan")))
            results[mode] = (codes, s, decoded, packed, unpack_signs(packed, n, scale=s[1:2]), *with_residual,
                             *encode_signs(x), unpack_signs(packed, n, scale=s[1:2], out=into), into,
                             sign_residual(x, packed, s[1:2]), sign_residual(in_place, packed, s[1:2], out=in_place),
                             decoded_into)
    for got, want in zip(results["compiled"], results["reference"]):
        assert got.dtype == want.dtype and torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))
    codes, s, decoded, _, signs, codes_r, s_r, residual, _, _, _, into, sign_res, in_place, dec_into = \
        results["reference"]
    assert torch.equal(codes_r, codes) and torch.equal(s_r, s) and torch.equal(residual, x - decoded)
    assert torch.equal(dec_into, decoded)
    assert torch.equal(into, signs) and torch.equal(sign_res, x - signs) and torch.equal(in_place, sign_res)


def test_native_codecs_without_avx512_give_the_same_bytes(monkeypatch, tmp_path):
    """The C's portable loops (what a CPU without AVX-512 runs; here the AVX-512 ones take every whole vector) built
    with -mno-avx512f into a fresh cache: every C kernel against the torch reference on the awkward values."""
    monkeypatch.setenv("FIELDTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-mno-avx512f"])
    monkeypatch.setattr(native, "_lib", [])
    if native.library() is None:
        pytest.skip("no C compiler: the native codecs are not built here")
    n = 3 * 10000 + 123
    x = _awkward(n, 4)
    results = {}
    for mode in ("compiled", "reference"):
        with kernel_mode(mode):
            got = []
            for bits, block in ((8, 256), (4, 256), (4, 300)):
                got += encode_with_residual(x, bits, block, generator=_gen("cpu", 3))
                codes, s = encode_blockwise(x, bits, block, stochastic=False)
                got += [codes, s, decode_blockwise(codes, s, n, bits, block)]
            packed, l1 = encode_signs(x)
            scale = (l1 / n).float().view(1)
            got += [packed, l1, unpack_signs(packed, n, scale=scale), sign_residual(x, packed, scale)]
            values, indices = topk_select(x, 3000)
            got += [values, indices, scatter_dense(n, indices, values)]
            P, QH = x[:12].view(3, 4), x[:4 * 2053].view(4, 2053)
            got += [lowrank_product(P, QH), torch.view_as_real(lowrank_product(torch.view_as_complex(P.reshape(3, 2, 2)),
                                                                                torch.view_as_complex(QH.reshape(2, -1, 2))))]
            results[mode] = got
    for got, want in zip(results["compiled"], results["reference"]):
        assert got.dtype == want.dtype and torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))


def test_native_build_is_cached_and_a_missing_compiler_falls_back_logged(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("FIELDTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_lib", [])
    if native.library() is not None:
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"                 # no temporary files left behind
        stamp = built[0].stat().st_mtime_ns
        monkeypatch.setattr(native, "_lib", [])
        assert native.library() is not None and built[0].stat().st_mtime_ns == stamp      # reused, not rebuilt
    monkeypatch.setattr(native, "_lib", [])
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="kernels.native"):
        assert native.library() is None and native.library() is None
    assert len(caplog.records) == 1 and "native C codecs unavailable" in caplog.records[0].message
    x = torch.randn(fused.AUTO_MIN_NUMEL + 5, generator=_gen("cpu"))
    with kernel_mode("compiled"):                                          # torch.compile's path instead
        got = encode_blockwise(x, 4, 256, generator=_gen("cpu", 2))
    with kernel_mode("reference"):
        want = encode_blockwise(x, 4, 256, generator=_gen("cpu", 2))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_native_topk_is_the_reference_with_ties_to_lower_indices(native_on):
    """The C top-k (sampled threshold, compress-stored candidates, quickselect, tie walk) gives the torch reference's
    values and indices where every threshold has many ties, signed zeros and a tail past the last 16-element chunk;
    the k-th largest's ties go to the lowest indices, as a stable descending sort orders them."""
    x = torch.randn(100_003, generator=_gen("cpu")).round(decimals=1)          # many ties at every threshold
    x[:50] = -0.0
    for k in (1, 3000, 40_000, 100_003):
        got = {}
        for mode in ("compiled", "reference"):
            with kernel_mode(mode):
                got[mode] = topk_select(x, k)
        want = torch.sort(x.abs(), descending=True, stable=True).indices[:k].sort().values
        assert torch.equal(got["compiled"][1], got["reference"][1]) and torch.equal(got["reference"][1].long(), want)
        assert torch.equal(got["compiled"][0], x[want]) and torch.equal(got["reference"][0], x[want])
    two = torch.tensor(2.0).view(torch.int32).item()
    assert native.topk(x, two, 10, 100) is None                    # more candidates than room: torch's path instead


@pytest.mark.parametrize("n,k", [(1000, 10), (100_003, 3000)])
def test_topk_ranks_nan_and_inf_largest_on_every_path(native_on, n, k):
    """A non-finite gradient (a rank's NaN loss, before the step is skipped) must still give k entries, the same on
    every path, or the ranks' allgathers would disagree in size: NaN ranks above inf, as in torch.topk."""
    x = torch.randn(n, generator=_gen("cpu", n))
    x[[5, 17]] = float("nan")
    x[99], x[600] = float("inf"), -float("inf")
    for mode in ("compiled", "reference"):
        with kernel_mode(mode):
            values, indices = topk_select(x, k)
        assert indices.shape == (k,) and {5, 17, 99, 600} <= set(indices.tolist()), mode
        assert torch.equal(values.view(torch.int32), x[indices.long()].view(torch.int32)), mode    # NaN's bits too
    nan = torch.full((n,), float("nan"))
    for mode in ("compiled", "reference"):
        with kernel_mode(mode):
            assert topk_select(nan, k)[1].tolist() == list(range(k)), mode       # all tied: the lowest indices


def test_native_topk_with_a_bad_sample_threshold_still_gives_the_reference(native_on, monkeypatch):
    """A sample that misjudges the tail (too low: more candidates than room; too high: fewer than k) sends the C to
    its all-candidates pass, with the reference's answer; the sampling stride is prime."""
    from kernels import sparse
    x = torch.randn(100_003, generator=_gen("cpu", 9)).round(decimals=2)
    with kernel_mode("reference"):
        want = topk_select(x, 3000)
    for r in (1, 16_000):                          # the 1st smallest of the sample, then nearly its largest
        monkeypatch.setattr(sparse, "_sample_plan", lambda n, k, r=r: (6, r))
        with kernel_mode("compiled"):
            got = topk_select(x, 3000)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), r
    monkeypatch.undo()
    stride = sparse._sample_plan(2_368_001, 23_681)[0]
    assert stride == 139 and all(stride % d for d in range(2, 12))       # n // 2^14 = 144 = 24 x 12 / 2


def test_native_scatter_add_is_index_add_in_order(native_on):
    """Duplicate indices whose sum depends on the order (1e8 + 1 - 1e8): the C path adds in index_add_'s order;
    an index out of range is a ValueError naming it, with out unchanged."""
    idx = torch.tensor([2, 0, 2, 2, 5], dtype=torch.int32)
    vals = torch.tensor([1e8, 3.0, 1.0, -1e8, -0.0])
    with kernel_mode("compiled"):
        got = scatter_dense(6, idx, vals)
    assert torch.equal(got, torch.zeros(6).index_add_(0, idx.long(), vals))
    out = torch.ones(6)
    with kernel_mode("compiled"), pytest.raises(ValueError, match="index 6 .entry 1. is out of range"):
        scatter_dense(6, torch.tensor([1, 6], dtype=torch.int32), torch.ones(2), out=out)
    assert torch.equal(out, torch.ones(6))

def _bits(t: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(t) if t.is_complex() else t).contiguous().view(-1).view(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("n,r,m", [(32, 4, 9216), (3, 1, 5), (7, 5, 2049), (1, 8, 4100)])
def test_native_lowrank_product_is_the_reference_and_a_matmul(native_on, dtype, n, r, m):
    """PowerSGD's decode P Q^H: C and torch reference give the same bits (terms added in order j, complex terms as
    (ac - bd, ad + bc)), signed zeros and subnormals included, written into a given `out` or a new tensor; against a
    float64 matmul the error stays within r + 2 roundings of the sum of |terms| (each term's product rounds once, or
    three times for a complex part, and r - 1 additions follow)."""
    g = _gen("cpu", n * 100 + r)
    P, QH = torch.randn(n, r, generator=g, dtype=dtype), torch.randn(r, m, generator=g, dtype=dtype)
    P[0, 0] = -0.0
    QH.view(-1)[1:40] = 1e-40
    with kernel_mode("compiled"):
        fast = lowrank_product(P, QH)
        into = torch.full((n, m), float("nan"), dtype=dtype)
        assert lowrank_product(P, QH, out=into) is into
    with kernel_mode("reference"):
        ref = lowrank_product(P, QH)
    assert torch.equal(_bits(fast), _bits(ref)) and torch.equal(_bits(into), _bits(ref))
    exact = P.to(torch.complex128 if dtype.is_complex else torch.float64) @ QH.to(torch.complex128 if dtype.is_complex
                                                                                  else torch.float64)
    scale = (P.abs().double() @ QH.abs().double()) * (2 if dtype.is_complex else 1)
    assert ((ref.to(exact.dtype) - exact).abs() <= (r + 2) * 2.0 ** -24 * scale + 1e-38).all()


def test_lowrank_product_refuses_mismatched_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"P \(3, 4\).*QH \(5, 7\)"):
        lowrank_product(torch.zeros(3, 4), torch.zeros(5, 7))
    with pytest.raises(ValueError, match="out is"):
        lowrank_product(torch.zeros(3, 4), torch.zeros(4, 7), out=torch.zeros(3, 8))
    with pytest.raises(ValueError, match="float32 or complex64"):
        lowrank_product(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(4, 7, dtype=torch.float64))

"""kernels/: exact round trips and byte layouts, quantisation error bounds and unbiasedness, sparsifiers,
the hash RNG's statistics, and compiled == reference byte for byte."""

import logging
import math

import numpy as np
import pytest
import torch

from kernels import (KernelMismatchError, decode_blockwise, dequantize_blockwise, encode_blockwise, encode_signs,
                     encode_with_residual, hash32, kernel_mode, pack_bits, pack_int4, pack_signs, quantize_blockwise,
                     randk_select, scatter_dense, sign_residual, topk_select, uniform, unpack_bits, unpack_int4,
                     unpack_signs)
from kernels import fused, native, quant
from kernels.rng import random_key, uniform_int

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = [0, 1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4099]


def _gen(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---- bit packing ----

def test_pack_bits_byte_layout():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [0x81, 0x01]
    assert pack_bits(torch.tensor([0, 1, 1, 0, 1], dtype=torch.bool)).tolist() == [0b10110]
    assert pack_signs(torch.tensor([-1.0, 0.0, -0.0, 2.0, -3.0])).tolist() == [0b01110]   # 0.0 and -0.0 are +


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES)
def test_bits_round_trip_matches_numpy(device, n):
    bits = torch.rand(n, generator=_gen("cpu", n)) < 0.5
    packed = pack_bits(bits.to(device))
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    assert packed.cpu().tolist() == np.packbits(bits.numpy(), bitorder="little").tolist()
    assert torch.equal(unpack_bits(packed, n).cpu(), bits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES)
def test_signs_round_trip(device, n):
    x = torch.randn(n, generator=_gen("cpu", n)).to(device)
    x[: n // 3] = 0.0                                   # zeros decode as +1
    for dtype in (torch.float32, torch.bfloat16):
        signs = unpack_signs(pack_signs(x), n, dtype=dtype)
        assert signs.dtype == dtype and signs.device == x.device
        assert torch.equal(signs.float(), torch.where(x >= 0, 1.0, -1.0))


@pytest.mark.parametrize("mode", ["compiled", "reference"])
@pytest.mark.parametrize("n", [0, 5, 16, 1003])
def test_encode_signs_packs_signs_and_sums_abs_in_float64(mode, n):
    """The bits are pack_signs'; the sum is exact where float64 is (quarter-integers: every partial sum is exact) and
    otherwise within the fixed order's rounding bound, (n/16 + 16) ulps of float64, of the correctly rounded fsum."""
    exact = (torch.arange(n) - n // 2).float() * 0.25
    x = torch.randn(n, generator=_gen("cpu", n)) * torch.logspace(-3, 3, n)
    with kernel_mode(mode):
        for v in (exact, x):
            bits, l1 = encode_signs(v)
            assert torch.equal(bits, pack_signs(v)) and l1.dtype == torch.float64 and l1.shape == ()
        assert encode_signs(exact)[1].item() == sum(abs(v) for v in exact.tolist())
        want = math.fsum(abs(v) for v in x.tolist())
        assert abs(encode_signs(x)[1].item() - want) <= (n / 16 + 16) * 2.0**-52 * want


def test_decode_into_out_checks_it():
    codes, s = encode_blockwise(torch.randn(40), 8, 16)
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 \(40,\) tensor"):
        decode_blockwise(codes, s, 40, 8, 16, out=torch.zeros(80)[::2])
    with pytest.raises(ValueError, match="out must be"):
        decode_blockwise(codes, s, 40, 8, 16, out=torch.zeros(40, dtype=torch.float64))


def test_bitpack_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"out is torch.float32 of shape \(4,\), expected torch.float32 of shape"):
        unpack_signs(torch.zeros(1, dtype=torch.uint8), 5, out=torch.zeros(4))
    with pytest.raises(ValueError, match="out is torch.float64"):
        sign_residual(torch.zeros(5), torch.zeros(1, dtype=torch.uint8), torch.ones(1), out=torch.zeros(5).double())
    with pytest.raises(ValueError, match="bool"):
        pack_bits(torch.ones(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1-D"):
        pack_signs(torch.ones(2, 2))
    with pytest.raises(ValueError, match="n=17"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 17)


# ---- int4 packing ----

@pytest.mark.parametrize("device", DEVICES)
def test_int4_every_value_and_layout(device):
    q = torch.arange(-8, 8, dtype=torch.int8, device=device)
    packed = pack_int4(q)
    # (-8, -7) -> low 0x8, high 0x9 -> 0x98; ...; (6, 7) -> 0x76
    expected = [((b & 0xF) << 4) | (a & 0xF) for a, b in zip(range(-8, 8, 2), range(-7, 8, 2))]
    assert packed.cpu().tolist() == expected
    assert torch.equal(unpack_int4(packed, 16), q)
    # every (low, high) pair, and the odd-n zero pad
    lo, hi = torch.meshgrid(q, q, indexing="ij")
    pairs = torch.stack([lo.reshape(-1), hi.reshape(-1)], dim=1).reshape(-1)
    assert torch.equal(unpack_int4(pack_int4(pairs), 512), pairs)
    assert pack_int4(torch.tensor([-1, 3, 5], dtype=torch.int8)).tolist() == [0x3F, 0x05]


@pytest.mark.parametrize("n", SIZES)
def test_int4_round_trip(n):
    q = torch.randint(-8, 8, (n,), generator=_gen("cpu", n), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == ((n + 1) // 2,)
    assert torch.equal(unpack_int4(packed, n), q)


# ---- blockwise quantisation ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n,block_size", [(1, 1), (1, 64), (9, 4), (100, 7), (1000, 64), (4099, 256)])
def test_nearest_rounding_error_bound(device, bits, n, block_size):
    levels = 2 ** (bits - 1) - 1
    x = (torch.randn(n, generator=_gen("cpu", n)) * torch.logspace(-3, 3, n)).to(device)
    q, scales = quantize_blockwise(x, bits, block_size, stochastic=False)
    nb = -(-n // block_size)
    assert q.dtype == torch.int8 and q.shape == (n,) and scales.dtype == torch.float32 and scales.shape == (nb,)
    absmax = torch.nn.functional.pad(x.abs(), (0, nb * block_size - n)).view(nb, block_size).amax(1)
    torch.testing.assert_close(scales, absmax / levels, rtol=0, atol=0)
    assert int(q.abs().max()) == levels                # each block's absmax maps to +-L
    s = scales.repeat_interleave(block_size)[:n]
    deq = dequantize_blockwise(q, scales, block_size)
    assert torch.all((x - deq).abs() <= s / 2 * (1 + 1e-5))
    assert torch.equal(q, torch.round(x.double() / s.double()).to(torch.int8))


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_unbiased_and_neighbouring(device):
    bits, block_size, n, draws = 4, 10, 50, 4000
    x = torch.randn(n, generator=_gen("cpu", 1), dtype=torch.float64)
    x[13] = 0.0
    # Tiling x keeps every block (and its scale) identical, so one call gives `draws` independent draws.
    q, scales = quantize_blockwise(x.float().repeat(draws).to(device), bits, block_size, generator=_gen(device, 2))
    q, scales = q.cpu().double().view(draws, n), scales.cpu().double().view(draws, n // block_size)
    assert torch.all(scales == scales[0])
    s = scales[0].repeat_interleave(block_size)
    v = x / s
    assert torch.all((q - v).abs() < 1 + 1e-5)        # floor(v) or ceil(v), never further
    assert torch.all(q.abs() <= 7)
    p = v - v.floor()                                   # P(round up)
    stderr = (s**2 * p * (1 - p) / draws).sqrt()
    mean = (q * s).mean(0)
    assert torch.all((mean - x).abs() <= 4 * stderr + 1e-6)
    # not secretly nearest rounding: elements with p near 1/2 take both levels
    both = (q.min(0).values != q.max(0).values)
    assert both[(p - 0.5).abs() < 0.4].all()


def test_stochastic_rounding_uses_generator():
    x = torch.randn(300, generator=_gen("cpu"))
    a = quantize_blockwise(x, 8, 32, generator=_gen("cpu", 5))
    b = quantize_blockwise(x, 8, 32, generator=_gen("cpu", 5))
    c = quantize_blockwise(x, 8, 32, generator=_gen("cpu", 6))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("stochastic", [False, True])
def test_zero_and_constant_blocks(stochastic):
    block_size = 8
    x = torch.cat([torch.zeros(8), torch.full((8,), -2.5), torch.full((5,), 0.75)])   # short last block
    q, scales = quantize_blockwise(x, 8, block_size, stochastic=stochastic, generator=_gen("cpu"))
    assert torch.equal(scales, torch.tensor([0.0, 2.5, 0.75]) / 127)
    assert q.tolist() == [0] * 8 + [-127] * 8 + [127] * 5
    deq = dequantize_blockwise(q, scales, block_size)
    torch.testing.assert_close(deq, x)
    assert torch.equal(deq[:8], torch.zeros(8))         # no NaN from 0 / 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_quantize_other_input_dtypes(dtype):
    x = torch.randn(77, generator=_gen("cpu")).to(dtype)
    q, scales = quantize_blockwise(x, 8, 16, stochastic=False)
    assert scales.dtype == torch.float32
    s = scales.repeat_interleave(16)[:77]
    assert torch.all((x.float() - dequantize_blockwise(q, scales, 16)).abs() <= s / 2 * (1 + 1e-5))


def test_int4_quantize_then_pack_round_trip():
    x = torch.randn(101, generator=_gen("cpu"))
    q, scales = quantize_blockwise(x, 4, 32, generator=_gen("cpu", 1))
    assert int(q.min()) >= -7 and int(q.max()) <= 7
    assert torch.equal(unpack_int4(pack_int4(q), 101), q)


def test_quant_rejects_bad_arguments():
    x = torch.randn(10)
    for bits in (1, 9):
        with pytest.raises(ValueError, match=f"bits.*{bits}"):
            quantize_blockwise(x, bits, 4)
    with pytest.raises(ValueError, match="block_size.*0"):
        quantize_blockwise(x, 8, 0)
    with pytest.raises(ValueError, match="floating"):
        quantize_blockwise(torch.ones(4, dtype=torch.int32), 8, 4)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        dequantize_blockwise(torch.zeros(10, dtype=torch.int8), torch.ones(2), 4)
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="n=5"):
        unpack_int4(torch.zeros(2, dtype=torch.uint8), 5)


# ---- sparsification ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k", [(1, 1), (1, 0), (10, 3), (17, 17), (1000, 10), (4099, 400)])
def test_topk_exact_and_contraction(device, n, k):
    x = torch.randn(n, generator=_gen("cpu", n)).to(device)
    values, indices = topk_select(x, k)
    assert values.shape == (k,) and indices.dtype == torch.int32
    expected = torch.sort(x.abs(), descending=True, stable=True).indices[:k].sort().values
    assert torch.equal(indices.long(), expected)
    assert torch.equal(values, x[expected])
    dense = scatter_dense(n, indices, values)
    assert ((x - dense) ** 2).sum() <= (1 - k / n) * (x**2).sum() * (1 + 1e-6)


@pytest.mark.parametrize("mode", ["compiled", "reference"])
def test_topk_ties_go_to_lower_indices(mode):
    x = torch.tensor([1.0, -3.0, 3.0, 0.5, -3.0, 2.0])
    with kernel_mode(mode):
        assert topk_select(x, 2)[1].tolist() == [1, 2] and topk_select(x, 2)[0].tolist() == [-3.0, 3.0]
        assert topk_select(x, 4)[1].tolist() == [1, 2, 4, 5]


@pytest.mark.parametrize("device", DEVICES)
def test_randk_distinct_sorted_uniform_unbiased(device):
    d, k, draws = 20, 5, 4000
    x = torch.randn(d, generator=_gen("cpu"), dtype=torch.float64).to(device)
    gen = _gen(device, 3)
    counts = torch.zeros(d, dtype=torch.float64)
    estimate = torch.zeros(d, dtype=torch.float64, device=device)
    for _ in range(draws):
        values, indices = randk_select(x, k, gen)
        assert indices.dtype == torch.int32 and indices.shape == (k,)
        assert torch.all(indices[1:] > indices[:-1])   # sorted and distinct
        assert torch.equal(values, x[indices.long()])  # unscaled
        counts[indices.long().cpu()] += 1
        scatter_dense(d, indices, values * (d / k), out=estimate)
    expected = draws * k / d
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60.0                                  # 19 dof: mean 19, P(chi2 > 60) ~ 4e-6
    mean = (estimate / draws).cpu()
    stderr = x.abs().cpu() * ((d / k - 1) / draws) ** 0.5   # per-element: (d/k) x_i Bernoulli(k/d)
    assert torch.all((mean - x.cpu()).abs() <= 4 * stderr)


def test_randk_uses_generator_and_edge_cases():
    x = torch.randn(50)
    a = randk_select(x, 7, _gen("cpu", 1))[1]
    assert torch.equal(a, randk_select(x, 7, _gen("cpu", 1))[1])
    assert not torch.equal(a, randk_select(x, 7, _gen("cpu", 2))[1])
    assert randk_select(x, 50, _gen("cpu"))[1].tolist() == list(range(50))
    assert randk_select(x, 0, _gen("cpu"))[1].shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_dense(device):
    idx = torch.tensor([1, 1, 3], dtype=torch.int32, device=device)
    val = torch.tensor([1.0, 2.0, 5.0], device=device)
    assert scatter_dense(5, idx, val).tolist() == [0.0, 3.0, 0.0, 5.0, 0.0]          # duplicates sum
    written = scatter_dense(5, idx[1:], val[1:], accumulate=False)
    assert written.tolist() == [0.0, 2.0, 0.0, 5.0, 0.0]
    # an allgather of (world, k) payloads, accumulated into an existing buffer
    out = torch.ones(5, device=device)
    ret = scatter_dense(5, torch.tensor([[0, 2], [2, 4]], device=device),
                        torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device), out=out)
    assert ret is out and out.tolist() == [2.0, 1.0, 6.0, 1.0, 5.0]
    overwritten = scatter_dense(5, idx[1:], val[1:], out=torch.ones(5, device=device), accumulate=False)
    assert overwritten.tolist() == [1.0, 2.0, 1.0, 5.0, 1.0]


def test_sparse_rejects_bad_arguments():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="k=11"):
        topk_select(x, 11)
    with pytest.raises(ValueError, match="k=-1"):
        randk_select(x, -1, _gen("cpu"))
    with pytest.raises(ValueError, match="1-D"):
        topk_select(x.view(2, 5), 1)
    with pytest.raises(ValueError, match="shape"):
        scatter_dense(10, torch.zeros(3, dtype=torch.int32), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(10,\)"):
        scatter_dense(10, torch.zeros(3, dtype=torch.int32), torch.zeros(3), out=torch.zeros(9))


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tail", "ties", "sparse"])
def test_topk_prefilter_path_is_exact_on_large_inputs(kind):
    """n above the sampling threshold: the sampled-threshold path must return exactly the k largest |x|."""
    g = torch.Generator().manual_seed(1)
    n, k = 300_001, 3_000
    x = {"gaussian": torch.randn(n, generator=g),
         "heavy_tail": torch.randn(n, generator=g) ** 5,
         "ties": torch.randint(-3, 4, (n,), generator=g).float(),
         "sparse": torch.zeros(n).index_fill_(0, torch.randperm(n, generator=g)[:k // 2], 1.0)}[kind]
    values, idx = topk_select(x, k)
    kth = x.abs().sort(descending=True).values[k - 1]
    assert idx.numel() == k and torch.unique(idx).numel() == k
    assert torch.equal(idx, idx.sort().values) and torch.equal(values, x[idx.long()])
    assert (x[idx.long()].abs() >= kth).all()
    assert (x.abs() > kth).sum() <= k            # nothing strictly larger was left out
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx.long()] = False
    assert (x.abs()[mask] <= kth).all()


@pytest.mark.parametrize("n,k", [(23, 5), (1000, 7), (10, 10)])
def test_randk_inclusion_is_exactly_k_over_n_for_uneven_arcs(n, k):
    """Arcs of floor/ceil(n/k): the rotation still makes every index's inclusion probability k/n."""
    draws = 3000
    x = torch.arange(n, dtype=torch.float32)
    gen = _gen("cpu", 7)
    counts = torch.zeros(n, dtype=torch.float64)
    for _ in range(draws):
        values, indices = randk_select(x, k, gen)
        assert indices.shape == (k,) and torch.all(indices[1:] > indices[:-1])
        assert torch.equal(values, x[indices.long()])
        counts[indices.long()] += 1
    p = k / n
    expected = draws * p
    if p < 1:
        # binomial per index; chi2 with n - 1 dof (the counts sum to draws k), bound at mean + 6 sd
        chi2 = float(((counts - expected) ** 2 / (expected * (1 - p))).sum())
        assert chi2 < (n - 1) + 6 * math.sqrt(2 * (n - 1))
    else:
        assert torch.all(counts == draws)


# ---- the hash RNG ----

def test_hash_rng_uniform_statistics():
    """u = (h >>> 8) 2^-24 over N = 2^20 consecutive indices: mean, variance, 64-bin chi2, neighbour pairs."""
    N = 1 << 20
    key = random_key(_gen("cpu", 11), "cpu")
    u = uniform(torch.arange(N, dtype=torch.int32), key).double()
    assert u.dtype == torch.float64 and float(u.min()) >= 0 and float(u.max()) < 1
    # CLT: sd of the mean sqrt(1/12 / N); of the sample variance sqrt((1/80 - 1/144) / N); bound at 5 sd
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / N)
    assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt((1 / 80 - 1 / 144) / N)
    # 64 bins: chi2 with 63 dof (mean 63, sd 11.2); 63 + 6 sd ~ 130 is exceeded with P < 1e-6
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    assert float(((counts - N / 64) ** 2 / (N / 64)).sum()) < 130
    # neighbours: (u_i, u_i+1) on an 8x8 grid, chi2 with 63 dof; correlation within 5 / sqrt(N)
    pairs = (u[:-1:2] * 8).long() * 8 + (u[1::2] * 8).long()
    counts = torch.bincount(pairs, minlength=64).double()
    assert float(((counts - N / 2 / 64) ** 2 / (N / 2 / 64)).sum()) < 130
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 5 / math.sqrt(N)


def test_hash_rng_uniform_over_keys_and_deterministic():
    """At fixed indices, over 4096 keys drawn from a generator: uniform (chi2), and the same key gives the same
    bits on every call; a different key gives different bits."""
    gen = _gen("cpu", 12)
    idx = torch.tensor([0, 1, 2, 1000, 2**31 - 1], dtype=torch.int32)
    us = torch.stack([uniform(idx, random_key(gen, "cpu")) for _ in range(4096)]).double()     # (4096, 5)
    for col in us.T:
        counts = torch.bincount((col * 16).long(), minlength=16).double()
        assert float(((counts - 256) ** 2 / 256).sum()) < 15 + 6 * math.sqrt(30)   # 15 dof
    key = torch.tensor([5, -7], dtype=torch.int32)
    assert torch.equal(hash32(idx, key), hash32(idx, key.clone()))
    assert not torch.equal(hash32(idx, key), hash32(idx, torch.tensor([5, -6], dtype=torch.int32)))
    # the documented formula, in Python integers
    t = (((1000 + 5) * 0x9E3779B1) % 2**32) ^ (-7 % 2**32)
    h = ((t ^ (t >> 16)) * 0x85EBCA6B) % 2**32
    assert int(hash32(torch.tensor([1000], dtype=torch.int32), key)) % 2**32 == h


def test_uniform_int_is_uniform():
    key = random_key(_gen("cpu", 13), "cpu")
    for high in (2, 3, 20, 1000):
        v = uniform_int(torch.arange(1 << 16, dtype=torch.int32), key, high)
        assert v.dtype == torch.int64 and int(v.min()) >= 0 and int(v.max()) < high
        if high <= 20:
            counts = torch.bincount(v, minlength=high).double()
            e = (1 << 16) / high
            assert float(((counts - e) ** 2 / e).sum()) < (high - 1) + 6 * math.sqrt(2 * (high - 1))


def test_stochastic_rounding_unbiased_over_calls_int8():
    """One element pattern, 2000 calls (2000 keys from the generator): the mean of q s is x within 4 CLT
    standard errors s sqrt(p (1 - p) / draws), p = frac(x / s), for every element."""
    n, block, draws = 64, 64, 2000
    x = torch.randn(n, generator=_gen("cpu", 3))
    gen = _gen("cpu", 4)
    qs = torch.stack([quantize_blockwise(x, 8, block, generator=gen)[0] for _ in range(draws)]).double()
    s = float(x.abs().max()) / 127
    v = x.double() / s
    p = v - v.floor()
    mean = qs.mean(0) * s
    assert torch.all((mean - x.double()).abs() <= 4 * s * (p * (1 - p) / draws).sqrt() + 1e-6)


# ---- compiled == reference ----

SIZES_COMPILED = [16 * 9, 16 * 9 + 7, 16 * 12 + 10]          # whole blocks; short odd tail; short even tail


@pytest.fixture(scope="module", params=["native", "inductor"])
def compiled_mode(request):
    """Every kernel call in the test on the compiled path: on CPU the C of kernels.native, then, with it switched
    off, torch.compile's (compiled once per body for the module: shapes are dynamic, so the sizes share graphs)."""
    with kernel_mode("compiled"), pytest.MonkeyPatch.context() as mp:
        if request.param == "native" and native.library() is None:
            pytest.skip("no C compiler: the native codecs are not built here")
        if request.param == "inductor":
            mp.setattr(native, "_lib", [None])
        yield request.param


@pytest.mark.parametrize("n", SIZES_COMPILED)
@pytest.mark.parametrize("bits,stochastic", [(8, True), (4, True), (8, False)])
def test_compiled_codecs_match_reference_bytes(compiled_mode, n, bits, stochastic):
    x = torch.randn(n, generator=_gen("cpu", n)) * torch.logspace(-2, 2, n)
    x[5:9] = 0.0
    results = {}
    for mode in ("compiled", "reference"):
        with kernel_mode(mode):
            q, s = quantize_blockwise(x, bits, 16, stochastic=stochastic, generator=_gen("cpu", 1))
            codes, s2 = encode_blockwise(x, bits, 16, stochastic=stochastic, generator=_gen("cpu", 1))
            results[mode] = (q, s, dequantize_blockwise(q, s, 16), codes, s2, decode_blockwise(codes, s2, n, bits, 16),
                             pack_signs(x))
    for got, want in zip(results["compiled"], results["reference"]):
        assert got.dtype == want.dtype and torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))
    q, s, _, codes, s2, decoded, _ = results["reference"]
    assert torch.equal(s, s2) and torch.equal(codes, _halves_layout(q, 16) if bits == 4 else q.view(torch.uint8))
    assert torch.equal(decoded, dequantize_blockwise(q, s, 16))


def _halves_layout(q: torch.Tensor, block: int) -> torch.Tensor:
    """encode_blockwise's 4-bit layout written out element by element: byte j of a block of t elements holds
    element j (low nibble) and element j + ceil(t/2) (high; 0 past the end)."""
    out = []
    for start in range(0, q.numel(), block):
        b = q[start:start + block].tolist()
        h = (len(b) + 1) // 2
        out += [(b[j] & 15) | ((b[j + h] & 15) << 4 if j + h < len(b) else 0) for j in range(h)]
    return torch.tensor(out, dtype=torch.uint8)


@pytest.mark.parametrize("n", [1, 16, 17, 40, 47])
def test_int4_codes_hold_a_blocks_halves(n):
    x = torch.randn(n, generator=_gen("cpu", n))
    q, _ = quantize_blockwise(x, 4, 16, stochastic=False)
    codes, _ = encode_blockwise(x, 4, 16, stochastic=False)
    assert torch.equal(codes, _halves_layout(q, 16))
    with pytest.raises(ValueError, match="block_size must be even"):
        encode_blockwise(x, 4, 15)


@pytest.mark.parametrize("n,k", [(1000, 100), (5003, 4099)])
def test_compiled_randk_matches_reference(compiled_mode, n, k):
    x = torch.randn(n, generator=_gen("cpu"))
    with kernel_mode("compiled"):
        got = randk_select(x, k, _gen("cpu", 9))
    with kernel_mode("reference"):
        want = randk_select(x, k, _gen("cpu", 9))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_compiled_path_is_what_auto_runs_on_large_inputs():
    """auto: the compiled path from AUTO_MIN_NUMEL elements (when it compiles), the same bytes as the reference."""
    n = fused.AUTO_MIN_NUMEL + 3
    x = torch.randn(n, generator=_gen("cpu"))
    with kernel_mode("auto"):
        got = encode_blockwise(x, 8, 256, generator=_gen("cpu", 2))
    with kernel_mode("reference"):
        want = encode_blockwise(x, 8, 256, generator=_gen("cpu", 2))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_mismatching_compiled_kernel_raises_naming_it(monkeypatch):
    broken = fused.FusedKernel("broken_codec", lambda x: x + 1, lambda x: x, lambda d: (torch.zeros(3, device=d),))
    for mode in ("compiled", "auto"):
        with kernel_mode(mode), pytest.raises(KernelMismatchError, match="broken_codec"):
            broken(torch.zeros(fused.AUTO_MIN_NUMEL))
    # a real kernel whose compiled output is corrupted after its self-check: check() catches it on any input
    real = quant._QUANTIZE.fast
    monkeypatch.setattr(quant._QUANTIZE, "fast", lambda *a: (real(*a)[0] ^ 1, real(*a)[1]))
    with pytest.raises(KernelMismatchError, match="quantize_blockwise"):
        quant._QUANTIZE.check(*quant._QUANTIZE.example(torch.device("cpu")))


def test_compile_failure_falls_back_with_one_warning_or_raises(monkeypatch, caplog):
    monkeypatch.setattr(fused, "_broken", {})

    def no_compiler(x):
        raise RuntimeError("gcc: not found")
    k = fused.FusedKernel("needs_gcc", no_compiler, lambda x: x * 2, lambda d: (torch.ones(3, device=d),))
    x = torch.ones(fused.AUTO_MIN_NUMEL)
    with kernel_mode("auto"), caplog.at_level(logging.WARNING, logger="kernels.fused"):
        assert torch.equal(k(x), x * 2) and torch.equal(k(x), x * 2)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "needs_gcc" in caplog.records[0].message and "gcc: not found" in caplog.records[0].message
    with kernel_mode("compiled"), pytest.raises(RuntimeError, match="needs_gcc.*gcc: not found"):
        k(x)


def test_kernel_mode_rejects_unknown_values():
    with pytest.raises(ValueError, match="'fast'"):
        kernel_mode("fast").__enter__()


def test_unpack_signs_scale_and_dtype():
    x = torch.randn(45, generator=_gen("cpu"))
    scale = torch.tensor(0.375)
    got = unpack_signs(pack_signs(x), 45, scale=scale)
    assert torch.equal(got, torch.where(x >= 0, 0.375, -0.375))
    assert unpack_signs(pack_signs(x), 45, torch.bfloat16, scale=scale).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [8, 4])
def test_encode_with_residual_is_encode_then_the_decode_error(compiled_mode, bits):
    """On every path (C, torch.compile, reference): the codes and scales of encode_blockwise with the same generator,
    and x - decode_blockwise(codes, scales) to the last bit."""
    n = 16 * 9 + 7
    x = torch.randn(n, generator=_gen("cpu", 5)) * torch.logspace(-2, 2, n)
    codes, s, residual = encode_with_residual(x, bits, 16, generator=_gen("cpu", 6))
    want_codes, want_s = encode_blockwise(x, bits, 16, generator=_gen("cpu", 6))
    assert torch.equal(codes, want_codes) and torch.equal(s, want_s)
    assert torch.equal(residual, x - decode_blockwise(codes, s, n, bits, 16))


def _abs_real_form(x: torch.Tensor) -> torch.Tensor:
    return x.abs().double()          # complex: the modulus bounds |re| and |im| of each real-form term's factor


@pytest.mark.parametrize("cplx", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_form_products_are_the_complex_products_within_rounding(cplx, dtype):
    """kernels.lowrank's project (M Q), coproject (P^H M) and expand (P Q^H) against the exact float64 products.
    Each is one real matmul of K real terms with inputs rounded to `dtype` (unit roundoff u: 2^-8 bfloat16, 2^-24
    float32), float32 accumulation (<= K 2^-24 |A||B|) and the result rounded to `dtype`; for complex entries a real
    output's terms are bounded by the moduli (|a c| + |b d| <= |a + bi| |c + di|), so elementwise
    |error| <= (2u + u^2 + K 2^-24)(1 + u) (|A| |B|) + u |AB|, with |A| |B| the product of the entries' moduli.
    A bfloat16 result above u^2 |A||B| somewhere shows the low-precision product ran."""
    from kernels.lowrank import coproject, expand, project, real_form
    g = torch.Generator().manual_seed(3)
    ct = torch.complex64 if cplx else torch.float32
    n, m, r = 37, 53, 5
    M, Q, P = (torch.randn(*s, generator=g, dtype=ct) for s in ((n, m), (m, r), (n, r)))
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    Mr = real_form(M, dtype)
    assert Mr.dtype == dtype and Mr.shape == (n, m * (2 if cplx else 1))
    QH = Q.mH.contiguous()
    for got, A, B in ((project(Mr, Q), M, Q), (coproject(P, Mr), P.mH, M), (expand(P, QH, dtype), P, QH)):
        exact = A.to(torch.complex128 if cplx else torch.float64) @ B.to(torch.complex128 if cplx else torch.float64)
        if cplx and not got.is_complex():        # expand's real form: (re, im) interleaved
            got = torch.view_as_complex(got.view(n, m, 2))
        assert got.shape == exact.shape and got.dtype == ct
        K = A.shape[1] * (2 if cplx else 1)
        mag = _abs_real_form(A) @ _abs_real_form(B)
        bound = (2 * u + u * u + K * 2.0**-24) * (1 + u) * mag + u * exact.abs()
        err = got.to(exact.dtype) - exact
        parts = (err.real, err.imag) if cplx else (err,)
        for part in parts:
            assert (part.abs() <= bound).all(), float((part.abs() / bound).max())
        if dtype == torch.bfloat16:
            assert (err.abs() > u * u * mag).any()

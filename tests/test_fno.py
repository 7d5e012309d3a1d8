"""Tests for trainer/models/fno.py: shapes, analytic Fourier multipliers, weight storage, resolution transfer."""

import math

import pytest
import torch

from trainer.models.fno import FNO, SpectralConv, copy_weights, fft_size, is_spectral_param, mode_matmul


def _signed_freqs(m: int) -> torch.Tensor:
    """Frequencies of the full-axis weight index: [0..m-1] then [-m..-1]."""
    return torch.cat([torch.arange(m), torch.arange(-m, 0)]).double()


# ---------------------------------------------------------------- shapes / resolutions

@pytest.mark.parametrize("modes", [(6,), (5, 4), (3, 3, 2)])
@pytest.mark.parametrize("padding", [0, 3])
def test_shapes_at_two_resolutions(modes, padding):
    torch.manual_seed(0)
    model = FNO(2, 3, modes, width=8, n_layers=2, lifting_channels=6 if padding else None,
                projection_channels=16, padding=padding)
    for n in (16, 24) if len(modes) < 3 else (8, 12):
        grid = (n,) * (len(modes) - 1) + (n + 2,)  # non-square on purpose
        y = model(torch.randn(2, 2, *grid))
        assert y.shape == (2, 3, *grid)
        assert torch.isfinite(y).all()


def test_int_modes_needs_dim_and_padding_is_applied():
    with pytest.raises(ValueError, match="dim"):
        FNO(1, 1, modes=4)
    torch.manual_seed(0)
    plain = FNO(1, 1, modes=4, dim=2, width=8, n_layers=2, projection_channels=8)
    padded = FNO(1, 1, modes=4, dim=2, width=8, n_layers=2, projection_channels=8, padding=4)
    assert plain.modes == (4, 4)
    copy_weights(plain, padded)
    x = torch.randn(1, 1, 16, 16)
    y0, y1 = plain(x), padded(x)
    assert y1.shape == y0.shape
    assert not torch.allclose(y0, y1, atol=1e-4)  # padding changed the (non-periodic) convolution


def test_fft_size_is_the_smallest_7_smooth_size_at_least_n():
    def smooth(m):
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        return m == 1
    for n in range(1, 400):
        m = fft_size(n)
        assert m >= n and smooth(m) and not any(smooth(k) for k in range(n, m))
    assert (fft_size(41), fft_size(72), fft_size(97)) == (42, 72, 98)


def test_padding_is_a_minimum_rounded_to_a_fast_fft_size():
    torch.manual_seed(0)
    fast = FNO(1, 1, modes=(4, 4), width=8, n_layers=2, projection_channels=8, padding=8)
    exact = FNO(1, 1, modes=(4, 4), width=8, n_layers=2, projection_channels=8, padding=8, fast_padding=False)
    periodic = FNO(1, 1, modes=(4, 4), width=8, n_layers=2, projection_channels=8, padding=0)
    assert fast.padded_grid((33, 30)) == (42, 40) and exact.padded_grid((33, 30)) == (41, 38)
    assert periodic.padded_grid((33, 30)) == (33, 30)      # no padding stays none (periodic data)
    copy_weights(fast, exact)
    x = torch.randn(2, 1, 33, 30)
    seen = []
    exact.blocks[0].spectral.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    fast.blocks[0].spectral.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    assert fast(x).shape == exact(x).shape == x.shape
    assert seen == [(42, 40), (41, 38)]


def test_mode_matmul_is_the_complex_contraction():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 6, dtype=torch.cdouble, generator=g)
    w = torch.randn(5, 7, 4, 6, dtype=torch.cdouble, generator=g)
    ref = torch.einsum("bixy,ioxy->boxy", x, w)
    assert torch.allclose(mode_matmul(x, w), ref, rtol=0, atol=1e-13)   # float64: rounding of 10-term sums
    xs, ws = x[:, :, 1:3], w[:, :, 1:3]                                     # strided corner views, as SpectralConv
    assert torch.allclose(mode_matmul(xs, ws), ref[:, :, 1:3], rtol=0, atol=1e-13)


# ---------------------------------------------------------------- analytic multipliers

def test_spectral_conv_is_exact_derivative_1d():
    n, m = 32, 17  # m = n//2 + 1: every rfft mode retained
    conv = SpectralConv(1, 1, (m,))
    with torch.no_grad():
        conv.weight.copy_((2j * math.pi * torch.arange(m).double()).to(torch.cfloat)[None, None])
    x = torch.arange(n, dtype=torch.float64) / n
    u = 1.0 + torch.sin(2 * math.pi * 3 * x) + 0.5 * torch.cos(2 * math.pi * 7 * x + 0.3)
    du = 2 * math.pi * (3 * torch.cos(2 * math.pi * 3 * x) - 3.5 * torch.sin(2 * math.pi * 7 * x + 0.3))
    y = conv(u.float()[None, None])[0, 0].double()
    assert (y - du).abs().max() < 1e-4 * du.abs().max()


def test_spectral_conv_is_exact_derivative_2d_corner_blocks():
    """d/dx1 on a non-square grid, with modes below the resolution on the full axis: exercises
    the [-m:] corner (negative frequencies) and the zero-fill between the corners."""
    n1, n2, m1, m2 = 20, 12, 6, 7
    conv = SpectralConv(1, 1, (m1, m2), weights="real")
    mult = (2j * math.pi * _signed_freqs(m1))[:, None].expand(2 * m1, m2)
    with torch.no_grad():
        conv.weight.copy_(torch.view_as_real(mult.to(torch.cfloat))[None, None])
    x1 = (torch.arange(n1, dtype=torch.float64) / n1)[:, None]
    x2 = (torch.arange(n2, dtype=torch.float64) / n2)[None, :]
    phase = 2 * math.pi * (5 * x1 - 4 * x2)  # k1 = 5 paired with a negative k2: both corners
    u = torch.sin(phase) + torch.cos(2 * math.pi * (2 * x1 + 3 * x2)) + torch.cos(2 * math.pi * 4 * x2)
    du = 2 * math.pi * (5 * torch.cos(phase) - 2 * torch.sin(2 * math.pi * (2 * x1 + 3 * x2)))
    y = conv(u.float()[None, None])[0, 0].double()
    assert (y - du).abs().max() < 1e-4 * du.abs().max()


def test_spectral_conv_identity_is_a_low_pass_3d():
    """Identity weights (per channel) reproduce the retained modes exactly and drop the rest."""
    n, m = (8, 10, 8), (3, 2, 3)
    conv = SpectralConv(2, 2, m)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2, dtype=torch.cfloat)[:, :, None, None, None].expand_as(conv.weight))
    axes = [torch.arange(k, dtype=torch.float64) / k for k in n]
    x1, x2, x3 = torch.meshgrid(*axes, indexing="ij")
    kept = torch.stack([torch.cos(2 * math.pi * (2 * x1 - 1 * x2 + 2 * x3)),
                        0.3 + torch.sin(2 * math.pi * (-2 * x1 + 1 * x2 + x3))])
    # Full axes keep frequencies -m..m-1, the rfft axis 0..m-1: these all lie outside.
    dropped = torch.cos(2 * math.pi * 4 * x1) + torch.sin(2 * math.pi * 3 * x2) + torch.cos(2 * math.pi * 3 * x3)
    y = conv((kept + dropped).float()[None])[0].double()
    assert (y - kept).abs().max() < 1e-5


# ---------------------------------------------------------------- weight storage

def test_init_is_deterministic_scaled_and_named():
    torch.manual_seed(3)
    a = FNO(1, 1, (4, 4), width=6, n_layers=2, projection_channels=8)
    torch.manual_seed(3)
    b = FNO(1, 1, (4, 4), width=6, n_layers=2, projection_channels=8, spectral_weights="real")
    spectral = [name for name, _ in a.named_parameters() if is_spectral_param(name)]
    assert spectral == ["blocks.0.spectral.weight", "blocks.1.spectral.weight"]
    for name, p in a.named_parameters():
        q = dict(b.named_parameters())[name]
        if is_spectral_param(name):
            assert p.dtype == torch.complex64 and q.dtype == torch.float32 and q.shape == (*p.shape, 2)
            assert p.shape == (6, 6, 8, 4)
            assert torch.equal(torch.view_as_real(p), q)  # same seed, same values in both forms
            parts = torch.view_as_real(p)
            assert parts.min() >= 0 and parts.max() < 1 / 36 and parts.std() > 0.005
        else:
            assert torch.equal(p, q)


def test_complex_and_real_storage_are_bit_identical():
    torch.manual_seed(0)
    c = FNO(2, 1, (5, 4), width=8, n_layers=3, projection_channels=16, padding=2)
    r = FNO(2, 1, (5, 4), width=8, n_layers=3, projection_channels=16, padding=2, spectral_weights="real")
    copy_weights(c, r)
    x = torch.randn(3, 2, 16, 12)
    target = torch.randn(3, 1, 16, 12)
    yc, yr = c(x), r(x)
    assert torch.equal(yc, yr)
    ((yc - target) ** 2).mean().backward()
    ((yr - target) ** 2).mean().backward()
    rp = dict(r.named_parameters())
    for name, p in c.named_parameters():
        g = torch.view_as_real(p.grad) if p.is_complex() else p.grad
        assert g.abs().max() > 0
        assert torch.equal(g, rp[name].grad), name
    # and back again: real -> complex reproduces the original model
    c2 = FNO(2, 1, (5, 4), width=8, n_layers=3, projection_channels=16, padding=2)
    copy_weights(r, c2)
    assert torch.equal(c2(x), yc)


# ---------------------------------------------------------------- resolution transfer

def _poisson_pairs(a: torch.Tensor, b: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """f = sum_k a_k cos(2 pi k x) + b_k sin(2 pi k x) on x = i/n, and the periodic zero-mean
    solution of -u'' = 4 pi^2 f, i.e. u_hat_k = f_hat_k / k^2. Returns (B, 1, n) float32 each."""
    k = torch.arange(1, a.shape[1] + 1, dtype=torch.float64)
    phase = 2 * math.pi * k[:, None] * (torch.arange(n, dtype=torch.float64) / n)[None, :]  # (K, n)
    cos, sin = torch.cos(phase), torch.sin(phase)
    f = a @ cos + b @ sin
    u = (a / k**2) @ cos + (b / k**2) @ sin
    return f[:, None].float(), u[:, None].float()


def _rel_l2(pred: torch.Tensor, true: torch.Tensor) -> float:
    return ((pred - true).norm(dim=-1) / true.norm(dim=-1)).mean().item()


def test_resolution_transfer_on_periodic_poisson():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n_modes, steps = 8, 300
    k = torch.arange(1, n_modes + 1, dtype=torch.float64)

    def coeffs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(batch, n_modes, generator=g, dtype=torch.float64) / k,
                torch.randn(batch, n_modes, generator=g, dtype=torch.float64) / k)

    f, u = _poisson_pairs(*coeffs(512), 64)
    model = FNO(1, 1, modes=12, dim=1, width=16, n_layers=3, projection_channels=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, f.shape[0], (32,), generator=g)
        loss = ((model(f[idx]) - u[idx]).norm(dim=-1) / u[idx].norm(dim=-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    a, b = coeffs(256)  # unseen inputs, evaluated on both grids
    with torch.no_grad():
        err = {n: _rel_l2(model(fn), un) for n in (64, 256) for fn, un in [_poisson_pairs(a, b, n)]}
    assert err[64] < 0.05, err
    assert err[256] < 1.5 * err[64] + 0.005, err


# ---------------------------------------------------------------- errors

def test_too_many_modes_names_resolution_and_modes():
    conv1 = SpectralConv(1, 1, (10,))
    conv1(torch.randn(1, 1, 18))  # 10 <= 18//2 + 1: fine
    with pytest.raises(ValueError, match=r"\(16,\).*\(10,\)"):
        conv1(torch.randn(1, 1, 16))
    conv2 = SpectralConv(1, 1, (9, 4))
    conv2(torch.randn(1, 1, 18, 6))
    with pytest.raises(ValueError, match=r"\(16, 16\).*\(9, 4\)"):  # 2*9 > 16 on the full axis
        conv2(torch.randn(1, 1, 16, 16))
    model = FNO(1, 1, (8, 8), width=4, n_layers=1, projection_channels=4, padding=2)
    model(torch.randn(1, 1, 14, 14))  # padded to 16: fits
    with pytest.raises(ValueError, match=r"\(12, 14\).*padding=2.*\(8, 8\)"):
        model(torch.randn(1, 1, 12, 14))


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="weights='half'"):
        SpectralConv(1, 1, (4,), weights="half")
    with pytest.raises(ValueError, match="spectral_weights='cplx'"):
        FNO(1, 1, (4,), spectral_weights="cplx")
    with pytest.raises(ValueError, match="4 dims"):
        FNO(1, 1, (2, 2, 2, 2))
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 16\)"):
        FNO(1, 1, (4,))(torch.randn(1, 2, 16))

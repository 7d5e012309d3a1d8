"""Probabilistic evaluation of an ensemble of fields against the truth.

Layouts: an ensemble is (M, B, C, *grid), members first; the truth is (B, C, *grid). Per-sample metrics
return (B,); calibration and spectrum metrics pool all samples and points into one 0-d tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check(ens: Tensor, truth: Tensor) -> None:
    if ens.dim() < 3 or tuple(ens.shape[1:]) != tuple(truth.shape):
        raise ValueError(f"ens must be (M, B, C, *grid) and truth (B, C, *grid); got ens {tuple(ens.shape)}, "
                         f"truth {tuple(truth.shape)}")


def ensemble_mean_rel_l2(ens: Tensor, truth: Tensor) -> Tensor:
    """||mean_m ens - truth||_2 / ||truth||_2 per sample, over (C, *grid): (B,)."""
    _check(ens, truth)
    err = (ens.mean(0) - truth).flatten(1).norm(dim=1)
    return err / truth.flatten(1).norm(dim=1)


def crps_ensemble(ens: Tensor, truth: Tensor, fair: bool = False) -> Tensor:
    """CRPS of the empirical ensemble at each point, averaged over (C, *grid): (B,).

    CRPS = E|X - y| - 1/2 E|X - X'| (Gneiting & Raftery 2007). For sorted members x_(1) <= ... <= x_(M),
    sum_{i,j} |x_i - x_j| = 2 sum_i (2i - M - 1) x_(i), so E|X - X'| costs a sort, O(M log M) per point.
    The plain estimator divides that sum by M^2 (the CRPS of the empirical distribution); `fair` divides
    by M (M - 1), which is unbiased for the CRPS of the distribution the members are drawn from
    (Ferro 2014).
    """
    _check(ens, truth)
    m = ens.shape[0]
    if fair and m < 2:
        raise ValueError(f"fair=True needs at least 2 members, got M={m}")
    skill = (ens - truth).abs().mean(0)
    weights = 2 * torch.arange(1, m + 1, dtype=ens.dtype, device=ens.device) - m - 1
    pair_sum = 2 * torch.tensordot(weights, ens.sort(dim=0).values, dims=1)       # sum_{i,j} |x_i - x_j|
    spread = pair_sum / (m * (m - 1) if fair else m * m)
    return (skill - spread / 2).flatten(1).mean(1)


def spread_skill_ratio(ens: Tensor, truth: Tensor) -> Tensor:
    """sqrt((M+1)/M * mean s^2) / RMSE(ensemble mean), pooled over samples and points: 0-d.

    s^2 is the unbiased (ddof 1) ensemble variance at each point. For members and truth drawn from the
    same distribution, E[(mean - y)^2] = (M+1)/M E[s^2] (Fortin et al. 2014), so the ratio is ~1; without
    the factor it would be sqrt(M/(M+1)). Below 1: under-dispersed (overconfident); above 1: over-dispersed.
    """
    _check(ens, truth)
    m = ens.shape[0]
    if m < 2:
        raise ValueError(f"spread_skill_ratio needs at least 2 members, got M={m}")
    spread = ens.var(dim=0, correction=1).mean() * (m + 1) / m
    skill = (ens.mean(0) - truth).pow(2).mean()
    return (spread / skill).sqrt()


def energy_spectrum(field: Tensor) -> tuple[Tensor, Tensor]:
    """Shell-summed power spectrum of 1-D (B, C, n) or 2-D (B, C, n1, n2) periodic fields.

    Wavenumbers are integers per axis (each axis of length 1), |k| = sqrt(kx^2 + ky^2) is rounded to the
    nearest integer shell, and E(k) = sum over the shell of |f_hat(k)|^2 / N^2 with f_hat the unnormalised
    DFT over the N grid points. By Parseval sum_k E(k) = mean over the grid of f^2. Returns
    k (K,) = 0..K-1 and E (B, C, K); shells past min(n) // 2 (the Nyquist shell) are only partly filled.
    """
    if field.dim() not in (3, 4):
        raise ValueError(f"field must be (B, C, n) or (B, C, n1, n2), got shape {tuple(field.shape)}")
    grid = field.shape[2:]
    power = torch.fft.fftn(field, dim=tuple(range(2, field.dim()))).abs().pow(2) / math.prod(grid) ** 2
    freqs = torch.meshgrid(*[torch.fft.fftfreq(n, 1 / n, dtype=torch.float64) for n in grid], indexing="ij")
    shell = torch.stack(freqs).pow(2).sum(0).sqrt().round().long().flatten().to(field.device)
    k = torch.arange(int(shell.max()) + 1, device=field.device)
    spectrum = power.new_zeros(*field.shape[:2], k.numel())
    spectrum.index_add_(2, shell, power.flatten(2))
    return k, spectrum


def spectrum_error(pred: Tensor, truth: Tensor) -> Tensor:
    """Mean over shells k = 1..min(n) // 2 of |log E_pred(k) - log E_true(k)|: 0-d.

    pred is (M, B, C, *grid) or (B, C, *grid); both spectra are averaged over members, samples and
    channels before the log. k = 0 (the mean) and the partly filled shells past Nyquist are left out.
    2 * pred gives log 4 = 1.386; a relative error of 10% in every shell gives ~0.095.
    """
    if pred.dim() == truth.dim() + 1:
        pred = pred.flatten(0, 1)
    if pred.shape[1:] != truth.shape[1:]:
        raise ValueError(f"pred must be (M, B, C, *grid) or (B', C, *grid) matching truth (B, C, *grid); "
                         f"got pred {tuple(pred.shape)}, truth {tuple(truth.shape)}")
    k_nyq = min(truth.shape[2:]) // 2
    e_pred = energy_spectrum(pred)[1].mean((0, 1))[1:k_nyq + 1]
    e_true = energy_spectrum(truth)[1].mean((0, 1))[1:k_nyq + 1]
    tiny = torch.finfo(e_true.dtype).tiny
    return (e_pred.clamp_min(tiny).log() - e_true.clamp_min(tiny).log()).abs().mean()

"""The ELBO's standard error (trainer/density/estimators.py) against the closed form for iid Gaussian log w."""

from __future__ import annotations

import math

import torch

from trainer.density import estimators


def test_standard_error_is_std_over_sqrt_k():
    """log w ~ N(mu, s^2) iid: the standard error of the mean is s / sqrt(K). The sample std's relative spread is
    1 / sqrt(2 (K - 1)) (0.7% at K = 10^4), so 5 of those bound it; the mean lies within 5 standard errors of mu."""
    g = torch.Generator().manual_seed(0)
    mu, s, K = -3.0, 2.5, 10_000
    log_w = mu + s * torch.randn(K, generator=g, dtype=torch.float64)
    se = estimators.standard_error(log_w).item()
    assert abs(se / (s / math.sqrt(K)) - 1) < 5 / math.sqrt(2 * (K - 1))
    assert abs(estimators.elbo(log_w).item() - mu) < 5 * se
    assert estimators.standard_error(torch.full((7,), 1.5)).item() == 0.0    # equal weights: no Monte-Carlo error

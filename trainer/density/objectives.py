"""Training objectives of diffusion samplers, as pure functions of per-trajectory sums (B,):
log_pf = sum_k log p_F, log_pb = sum_k log p_B (trajectories from sde.py) and log_reward = log R(x_T), the target's
unnormalised log density. With log w = log_reward + log_pb - log_pf, every loss below is zero, or its minimum, exactly
when log w is the same constant log Z on every trajectory, i.e. when the policy's path measure is the target's.

TB and VarGrad take trajectories simulated with keep_graph=False (on- or off-policy, or from simulate_backward);
PIS and DDS take on-policy trajectories simulated with keep_graph=True, so they are differentiated through the path.
"""

from __future__ import annotations

import torch


def _sums(*terms: torch.Tensor) -> None:
    shape = terms[0].shape
    assert len(shape) == 1 and all(t.shape == shape for t in terms), \
        f"per-trajectory sums of shape (B,) expected, got {[tuple(t.shape) for t in terms]}"


def trajectory_balance_loss(log_pf: torch.Tensor, log_pb: torch.Tensor, log_reward: torch.Tensor,
                            log_z: torch.Tensor) -> torch.Tensor:
    """Trajectory balance (Malkin et al. 2022; Sendera et al. 2024), log_z a learned scalar:
    mean_b (log Z_theta + sum log p_F - log R(x_T) - sum log p_B)^2."""
    _sums(log_pf, log_pb, log_reward)
    return (log_z + log_pf - log_reward - log_pb).pow(2).mean()


def vargrad_loss(log_pf: torch.Tensor, log_pb: torch.Tensor, log_reward: torch.Tensor) -> torch.Tensor:
    """VarGrad (Richter et al. 2020; Sendera et al. 2024): the batch variance of r = sum log p_F - log R - sum log p_B,
    mean_b (r_b - mean r)^2, i.e. TB with log Z replaced by the batch estimate -mean r (gfn-diffusion detaches that
    estimate; value and gradient are the same, since the deviations sum to zero)."""
    _sums(log_pf, log_pb, log_reward)
    r = log_pf - log_reward - log_pb
    return (r - r.mean()).pow(2).mean()


def pis_loss(log_pf: torch.Tensor, log_pb: torch.Tensor, log_reward: torch.Tensor) -> torch.Tensor:
    """PIS (Zhang & Chen 2022, in discrete time): the reparameterised reverse KL against the Brownian reference,
    mean_b (sum log p_F - sum log p_B - log R(x_T)) = KL(P_F || P_target) - log Z >= -log Z.
    With the bridge backward, sum log p_F - sum log p_B = log dP_F/dP_ref + log N(x_T; 0, sigma^2 I)."""
    _sums(log_pf, log_pb, log_reward)
    return (log_pf - log_pb - log_reward).mean()


def denoising_diffusion_sampler_loss(log_pf: torch.Tensor, log_pb: torch.Tensor,
                                     log_reward: torch.Tensor) -> torch.Tensor:
    """DDS, the denoising diffusion sampler (Vargas et al. 2023, in discrete time): the same reparameterised
    reverse KL, mean_b (sum log p_F - sum log p_B - log R(x_T)) = KL(P_F || P_target) - log Z, on trajectories of the
    OU reference (sde.py, reference="ou"), where sum log p_F includes log N(x_0; 0, sigma^2 I)."""
    return pis_loss(log_pf, log_pb, log_reward)

"""Exponential moving averages of the weights, kept beside the engine's own and used for evaluation and sampling.

    ema = WeightEMA(cfg.ema, engine)     # [ema] kind = "power" | "halflife" | "none"
    ema.update()                         # after each applied optimizer step
    with ema.swapped():                  # the averaged weights in the model, the trained ones back afterwards
        evaluate()

Profiles, with t the number of updates so far (t = 1 at the first, which copies the weights):
- "halflife" (Karras et al. 2022, EDM, training_loop.py's ema_halflife_kimg / ema_rampup_ratio, counted in steps):
  beta_t = 0.5 ** (1 / h_t),  h_t = min(halflife_steps, rampup_ratio * t)  (no ramp-up when rampup_ratio = 0).
- "power" (Karras et al. 2024, EDM2, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3.1):
  beta_t = (1 - 1/t) ** (gamma + 1), which weights the weights of step tau by (1 - beta_tau) (tau / t) ** (gamma + 1),
  ~ tau ** gamma: a power-function profile whose width relative to the run is
  sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 (gamma + 3)))  (EDM2 Eq. 3); `std` is sigma_rel, gamma its root.

The average is over this rank's `Engine.master_weights()` (whole parameters for DDP and ZeRO-1/2, this rank's shard
for FSDP2 and ZeRO-3), in fp32, so it costs one more fp32 copy of what the rank holds and no communication.
"""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger("fieldtrain")


def power_gamma(std: float) -> float:
    """EDM2's exponent gamma for a relative width sigma_rel = std: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2) = 0 (Eq. 3 multiplied out)."""
    t = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    gamma = float(roots[np.abs(roots.imag) < 1e-9].real.max())
    assert gamma > -1, (std, gamma)
    return gamma


def power_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def ema_beta(kind: str, t: int, *, halflife_steps: float = 0.0, rampup_ratio: float = 0.0,
             gamma: float = 0.0) -> float:
    """Decay at the t-th update (t >= 1): ema <- beta ema + (1 - beta) w."""
    assert t >= 1
    if kind == "power":
        return (1 - 1 / t) ** (gamma + 1)
    assert kind == "halflife", kind
    h = halflife_steps if rampup_ratio <= 0 else min(halflife_steps, rampup_ratio * t)
    return 0.5 ** (1 / max(h, 1e-8))


class WeightEMA(Stateful):
    """The average of `engine.master_weights()`; checkpointed under "ema" in the engine's own layout."""

    def __init__(self, cfg, engine):
        self.cfg, self.engine = cfg, engine
        self.gamma = power_gamma(cfg.std) if cfg.kind == "power" else 0.0
        self.updates = 0
        with torch.no_grad():
            self.shadow = {n: _fp32_clone(w) for n, w in engine.master_weights().items()}

    def beta(self, t: int) -> float:
        return ema_beta(self.cfg.kind, t, halflife_steps=self.cfg.halflife_steps,
                        rampup_ratio=self.cfg.rampup_ratio, gamma=self.gamma)

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        beta = self.beta(self.updates)
        for n, w in self.engine.master_weights().items():
            s = self.shadow[n]
            s.lerp_(w.to(s.dtype), 1 - beta)   # s = beta s + (1 - beta) w

    @contextlib.contextmanager
    def swapped(self):
        """The averaged weights in the model for the duration (e.g. evaluation), the trained ones restored after."""
        with torch.no_grad():
            saved = {n: _fp32_clone(w) for n, w in self.engine.master_weights().items()}
            self.engine.load_master_weights(self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                self.engine.load_master_weights(saved)

    # ---- checkpoint --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"updates": torch.tensor(self.updates), "kind": self.cfg.kind,
                "weights": self.engine.master_weights_for_checkpoint(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        with torch.no_grad():
            self.engine.load_master_weights_from_checkpoint(self.shadow, state["weights"])


def _fp32_clone(w: torch.Tensor) -> torch.Tensor:
    w = w.detach()
    return w.to(torch.complex64 if w.is_complex() else torch.float32, copy=True)

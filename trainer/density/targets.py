"""Unnormalised target densities for diffusion samplers (PIS, DDS, trajectory balance).

    target = get_target("manywell")                   # or get_target("gaussian", mu=1.0, std=0.5, dim=4)
    lp = checked_log_prob(target, x_bd)               # (B,) unnormalised log density; ValueError on NaN, +inf, shape
    x_bd = target.sample(2000, generator=g)           # exact samples, for EUBO and W2

The built-in targets are those of Sendera et al. 2024 (App. B), with exact log Z and exact samplers:
'gmm25', 'funnel', 'funnel_easy', 'manywell', 'mog40', 'gaussian'. A user's own density is "package.module:callable"
(`load_user_target`, or `get_target` with a name holding ':'). log_prob takes any float dtype and device;
sample draws on the CPU.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

LOG_2PI = math.log(2 * math.pi)


class Target:
    """A density known up to its normaliser: log_prob(x) = log p(x) + log Z."""
    name: str
    dim: int
    log_z: float | None = None      # exact log normaliser, when known
    has_sampler: bool = True        # False: sample() raises (no EUBO / W2 against exact samples)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:   # (B, dim) -> (B,)
        raise NotImplementedError

    def grad_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) score of the unnormalised density, by autograd; subclasses override with closed forms."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(x).sum(), x)
        return g

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """(n, dim) exact samples on the CPU, drawn in float64 and returned in `dtype` (default: torch's)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"target {self.name!r}: sample count n = {n!r}; must be an integer >= 0")
        if not self.has_sampler:
            raise ValueError(f"target {self.name!r} has no exact sampler; metrics that need target samples "
                             f"(EUBO, W2) are unavailable for it")
        return self._sample(n, generator).to(dtype or torch.get_default_dtype())

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:   # (n, dim) float64
        raise NotImplementedError

    def plot_range(self) -> tuple[float, float]:
        return (-5.0, 5.0)


def checked_log_prob(target: Target, x: torch.Tensor) -> torch.Tensor:
    """target.log_prob(x), or ValueError naming the target if x is not (B, dim) or the result is not a (B,) float
    tensor free of NaN and +inf. -inf (zero density) is allowed."""
    if x.ndim != 2 or x.shape[1] != target.dim:
        raise ValueError(f"target {target.name!r}: x has shape {tuple(x.shape)}; expected (B, {target.dim})")
    lp = target.log_prob(x)
    if not isinstance(lp, torch.Tensor) or lp.shape != (x.shape[0],) or not lp.is_floating_point():
        got = f"shape {tuple(lp.shape)}, {lp.dtype}" if isinstance(lp, torch.Tensor) else type(lp).__name__
        raise ValueError(f"target {target.name!r}: log_prob of a ({x.shape[0]}, {target.dim}) batch gave {got}; "
                         f"expected a float tensor of shape ({x.shape[0]},)")
    bad = torch.isnan(lp) | (lp == math.inf)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"target {target.name!r}: log_prob is {lp[i].item()} at x = {x[i].tolist()} "
                         f"({int(bad.sum())} of {lp.numel()} values NaN or +inf)")
    return lp


def _positive(target: str, key: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"target {target!r}: {key!r} = {value!r}; must be a number > 0")
    return float(value)


def _dim(target: str, value: int, even: bool = False, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least or (even and value % 2):
        raise ValueError(f"target {target!r}: 'dim' = {value!r}; must be {'an even' if even else 'an'} integer "
                         f">= {least}")
    return value


class IsotropicMixture(Target):
    """Equal-weight mixture of N(mu_k, s^2 I):
    log p(x) = logsumexp_k(-|x - mu_k|^2 / 2s^2) - log K - d/2 log(2 pi s^2)."""

    def __init__(self, name: str, means: torch.Tensor, std: float, span: tuple[float, float]):
        self.name, self.means, self.std, self.span = name, means.to(torch.float64), std, span
        self.dim, self.log_z = means.shape[1], 0.0

    def _logits(self, x):   # (B, K): log N(x; mu_k, s^2 I) - log K
        mu = self.means.to(x)
        sq = (x[:, None, :] - mu[None]).pow(2).sum(-1)
        return -0.5 * sq / self.std**2 - 0.5 * self.dim * (LOG_2PI + 2 * math.log(self.std)) - math.log(len(mu))

    def log_prob(self, x):
        return torch.logsumexp(self._logits(x), dim=1)

    def grad_log_prob(self, x):   # sum_k r_k(x) (mu_k - x) / s^2, r = softmax of the component log densities
        r = torch.softmax(self._logits(x), dim=1)
        return (r @ self.means.to(x) - x) / self.std**2

    def _sample(self, n, generator):
        k = torch.randint(len(self.means), (n,), generator=generator)
        return self.means[k] + self.std * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)

    def plot_range(self):
        return self.span


def gmm25() -> Target:
    """25GMM (Sendera et al. 2024, B.1): means {-10, -5, 0, 5, 10}^2, covariance 0.3 I, equal weights; log Z = 0."""
    grid = torch.arange(-10.0, 10.1, 5.0, dtype=torch.float64)
    return IsotropicMixture("gmm25", torch.cartesian_prod(grid, grid), math.sqrt(0.3), (-15.0, 15.0))


MOG40_MEANS = Path(__file__).with_name("mog40_means.json")


def mog40() -> Target:
    """MoG-40 (Sendera et al. 2024, B.1): 40 equal-weight N(mu_k, I), mu_k uniform in [-40, 40]^2; log Z = 0. The
    means are the table shipped in mog40_means.json (its note says how it was drawn): implementations disagree."""
    means = torch.tensor(json.loads(MOG40_MEANS.read_text())["means"], dtype=torch.float64)
    assert means.shape == (40, 2) and means.abs().max() <= 40, f"{MOG40_MEANS} holds {tuple(means.shape)} means"
    return IsotropicMixture("mog40", means, 1.0, (-50.0, 50.0))


class Funnel(Target):
    """Neal's funnel (Sendera et al. 2024, B.1): x0 ~ N(0, s^2), x_{1..d-1} | x0 ~ N(0, e^{x0} I); normalised.

    log p(x) = -x0^2 / 2s^2 - 1/2 log(2 pi s^2) - (d-1)/2 (log 2 pi + x0) - e^{-x0} |x_{1:}|^2 / 2.
    'funnel' has s = 3; 'funnel_easy' has s = 1, PIS's code's value, which Sendera et al. call a bug later work copied.
    """

    def __init__(self, name: str, dim: int, x0_std: float):
        self.name, self.dim, self.s, self.log_z = name, _dim(name, dim, least=2), x0_std, 0.0

    def log_prob(self, x):
        x0, rest = x[:, 0], x[:, 1:]
        return (-0.5 * x0**2 / self.s**2 - 0.5 * (LOG_2PI + 2 * math.log(self.s))
                - 0.5 * (self.dim - 1) * (LOG_2PI + x0) - 0.5 * torch.exp(-x0) * rest.pow(2).sum(1))

    def grad_log_prob(self, x):
        x0, rest = x[:, :1], x[:, 1:]
        e = torch.exp(-x0)
        g0 = -x0 / self.s**2 - 0.5 * (self.dim - 1) + 0.5 * e * rest.pow(2).sum(1, keepdim=True)
        return torch.cat([g0, -e * rest], dim=1)

    def _sample(self, n, generator):
        x0 = self.s * torch.randn(n, 1, generator=generator, dtype=torch.float64)
        return torch.cat([x0, torch.exp(0.5 * x0) * torch.randn(n, self.dim - 1, generator=generator,
                                                                 dtype=torch.float64)], dim=1)

    def plot_range(self):
        return (-3.0 * self.s - 1.0, 3.0 * self.s + 1.0)


def funnel(dim: int = 10) -> Target:
    return Funnel("funnel", dim, 3.0)


def funnel_easy(dim: int = 10) -> Target:
    return Funnel("funnel_easy", dim, 1.0)


# Z1 = int exp(-x^4 + 6x^2 + x/2) dx over the real line, by mpmath.quad at 30 digits on [-6, -1.7, 0, 1.7, 6]
# (the integrand is below e^-1000 outside); scipy.integrate.quad agrees to 1e-15. gfn-diffusion uses 11784.50927.
MANYWELL_Z1 = 11784.509265127827


class ManyWell(Target):
    """Many-well (Sendera et al. 2024, B.1; from Noe et al. 2019): d/2 independent double wells, pairs (x1, x2) at
    coordinates (2i, 2i+1) as in gfn-diffusion.

    log p(x) = sum_i (-x1_i^4 + 6 x1_i^2 + x1_i / 2 - x2_i^2 / 2);   log Z = d/2 (ln Z1 + 1/2 ln 2 pi)
    (= 164.6957 at d = 32).
    """
    L, CELLS = 4.0, 1 << 15   # the x1 sampler's grid: mass beyond |x1| > 4 is below e^-160

    def __init__(self, dim: int = 32):
        self.name, self.dim = "manywell", _dim("manywell", dim, even=True, least=2)
        self.log_z = dim // 2 * (math.log(MANYWELL_Z1) + 0.5 * LOG_2PI)

    @staticmethod
    def log_f(x1):   # the unnormalised log density of x1
        return -x1**4 + 6 * x1**2 + 0.5 * x1

    def log_prob(self, x):
        x1, x2 = x[:, 0::2], x[:, 1::2]
        return (self.log_f(x1) - 0.5 * x2**2).sum(1)

    def grad_log_prob(self, x):
        g = torch.empty_like(x)
        g[:, 0::2] = -4 * x[:, 0::2]**3 + 12 * x[:, 0::2] + 0.5
        g[:, 1::2] = -x[:, 1::2]
        return g

    def _sample_x1(self, m: int, generator) -> torch.Tensor:
        """m exact draws of x1 by rejection from a piecewise-constant envelope on CELLS cells of [-L, L].

        On a cell [a, b] of width h, |d log f / dx| <= G = 4L^3 + 12L + 1/2, so log f(x) <= min(log f(a) + (x-a) G,
        log f(b) + (b-x) G) <= (log f(a) + log f(b))/2 + hG/2 =: e_j. Pick cell j with probability exp(e_j) / sum,
        x uniform in it, accept with probability f(x) / exp(e_j) <= 1: exact draws of f restricted to [-L, L]
        (acceptance 0.964). The tails beyond are below e^-160 of the mass.
        """
        edges = torch.linspace(-self.L, self.L, self.CELLS + 1, dtype=torch.float64)
        h, G = 2 * self.L / self.CELLS, 4 * self.L**3 + 12 * self.L + 0.5
        lf = self.log_f(edges)
        env = 0.5 * (lf[1:] + lf[:-1]) + 0.5 * h * G                      # (CELLS,) log envelope height
        cdf = torch.cumsum(torch.exp(env - env.max()), 0)
        out, have = [torch.empty(0, dtype=torch.float64)], 0
        while have < m:
            k = max(1024, int(1.1 * (m - have)))
            j = torch.searchsorted(cdf, cdf[-1] * torch.rand(k, generator=generator, dtype=torch.float64), right=True)
            j = j.clamp_(max=self.CELLS - 1)
            x = edges[j] + h * torch.rand(k, generator=generator, dtype=torch.float64)
            ok = torch.rand(k, generator=generator, dtype=torch.float64).log() < self.log_f(x) - env[j]
            out.append(x[ok])
            have += int(ok.sum())
        return torch.cat(out)[:m]

    def _sample(self, n, generator):
        x = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x[:, 0::2] = self._sample_x1(n * (self.dim // 2), generator).view(n, self.dim // 2)
        return x

    def plot_range(self):
        return (-3.0, 3.0)


class Gaussian(Target):
    """N(mu, std^2 I) times e^log_z (for closed-form tests of the objectives):
    log_prob(x) = -|x - mu|^2 / 2 std^2 - d/2 log(2 pi std^2) + log_z;  Z = e^log_z."""

    def __init__(self, mu: float | Sequence[float] = 0.0, std: float = 1.0, dim: int = 2, log_z: float = 0.0):
        self.name, self.dim = "gaussian", _dim("gaussian", dim)
        try:
            self.mu = torch.as_tensor(mu, dtype=torch.float64).expand(dim).clone()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"target 'gaussian': 'mu' = {mu!r}; must be a number or {dim} numbers") from None
        if not torch.isfinite(self.mu).all():
            raise ValueError(f"target 'gaussian': 'mu' = {mu!r}; must be finite")
        self.std = _positive("gaussian", "std", std)
        if isinstance(log_z, bool) or not isinstance(log_z, (int, float)) or not math.isfinite(log_z):
            raise ValueError(f"target 'gaussian': 'log_z' = {log_z!r}; must be a finite number")
        self.log_z = float(log_z)

    def log_prob(self, x):
        return (-0.5 * (x - self.mu.to(x)).pow(2).sum(1) / self.std**2
                - 0.5 * self.dim * (LOG_2PI + 2 * math.log(self.std)) + self.log_z)

    def grad_log_prob(self, x):
        return -(x - self.mu.to(x)) / self.std**2

    def _sample(self, n, generator):
        return self.mu + self.std * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)

    def plot_range(self):
        return (float(self.mu.min()) - 5 * self.std, float(self.mu.max()) + 5 * self.std)


TARGETS: dict[str, Callable[..., Target]] = {
    "gmm25": gmm25, "funnel": funnel, "funnel_easy": funnel_easy, "manywell": ManyWell, "mog40": mog40,
    "gaussian": Gaussian,
}


def get_target(name: str, **params) -> Target:
    """A built-in target by name, or a user's "package.module:callable" (see load_user_target)."""
    if isinstance(name, str) and ":" in name:
        return load_user_target(name, **params)
    if name not in TARGETS:
        raise ValueError(f"config key 'target.name' = {name!r}; allowed: {', '.join(map(repr, TARGETS))}, "
                         f"or 'package.module:callable'")
    make = TARGETS[name]
    allowed = list(inspect.signature(make).parameters)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"target {name!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(map(repr, allowed)) or 'none'}")
    return make(**params)


class UserTarget(Target):
    """A user's log-density function fn(x: (B, dim)) -> (B,), with no exact sampler."""
    has_sampler = False

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], dim: int, log_z: float | None):
        self.name, self.fn, self.dim, self.log_z = name, fn, dim, log_z

    def log_prob(self, x):
        return self.fn(x)


def load_user_target(path: str, **params) -> Target:
    """The target at "package.module:callable": a Target subclass (called with params), a Target instance, or a
    log-density function fn(x) -> (B,) whose dim and log_z come from params or else from fn.dim / fn.log_z.
    Probed once on a (4, dim) float32 batch; any failure is a ValueError naming the path."""
    def fail(why: str):
        raise ValueError(f"target {path!r}: {why}")

    module, _, attr = str(path).partition(":")
    if not module or not attr:
        fail("must be 'package.module:callable'")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:   # an import error, or any error the module raises on import
        fail(f"cannot load it ({type(e).__name__}: {e})")
    if isinstance(obj, type) and issubclass(obj, Target):
        try:
            target = obj(**params)
        except (TypeError, ValueError) as e:
            fail(f"{attr}(**{params}) failed ({e})")
    elif isinstance(obj, Target):
        if params:
            fail(f"is a Target instance and takes no parameters; got {sorted(params)}")
        target = obj
    elif callable(obj):
        unknown = sorted(set(params) - {"dim", "log_z"})
        if unknown:
            fail(f"unknown parameter(s) {unknown}; a log-density function takes 'dim' and 'log_z'")
        dim, log_z = params.get("dim", getattr(obj, "dim", None)), params.get("log_z", getattr(obj, "log_z", None))
        if dim is None:
            fail("dimension unknown; give 'dim' (target.dim) or set the function's attribute 'dim'")
        _dim(path, dim)
        if log_z is not None and (isinstance(log_z, bool) or not isinstance(log_z, (int, float))
                                  or not math.isfinite(log_z)):
            fail(f"'log_z' = {log_z!r}; must be a finite number or None")
        target = UserTarget(path, obj, dim, None if log_z is None else float(log_z))
    else:
        fail(f"is a {type(obj).__name__}, not callable")
    target.name = path
    probe = torch.randn(4, target.dim, generator=torch.Generator().manual_seed(0))
    try:
        checked_log_prob(target, probe)
    except ValueError:
        raise
    except Exception as e:
        fail(f"log_prob on a (4, {target.dim}) float32 batch raised {type(e).__name__}: {e}")
    return target

"""Fourier Neural Operator (Li et al. 2021, "Fourier Neural Operator for Parametric PDEs").

    v_0     = P(x, grid)                                    lifting, pointwise
    v_{l+1} = sigma( K_l v_l + W_l v_l ),  l = 0..L-1       (no sigma after the last layer)
    (K v)   = IFFT( R_l . FFT(v) )                          R_l acts on the lowest modes only
    u       = Q(v_L)                                        projection, pointwise

Generic over d = 1, 2, 3 spatial dims; tensors are channels-first, (batch, channels, *grid).
The spectral weights R_l are mesh-independent, so the same model evaluates at any resolution
that resolves its modes (the "zero-shot super-resolution" of the paper).

Spectral weights are stored either as complex64 parameters ("complex") or as float32 with a
trailing (real, imag) dim of 2 ("real"), viewed as complex in forward. The two are bit-identical;
the real form exists because torch's DDP powerSGD_hook mishandles complex parameters.
Spectral parameters are named `...spectral.weight` (see `is_spectral_param`).

Parametrization (`model.fno.parametrization`): "standard" is the above; "mup" is the maximal-update parametrization
(`mup_lr_multipliers` states its rules), under which the best learning rate of a width carries over to the others.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.models.losses import operator_errors, operator_example_batch, operator_loss
from trainer.registry import DataSpec, ModelSpec, register_model

SPECTRAL_WEIGHT_FORMS = ("complex", "real")
PARAMETRIZATIONS = ("standard", "mup")
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def is_spectral_param(name: str) -> bool:
    """True for parameter names (from `named_parameters()`) that hold FNO spectral weights."""
    return name == "spectral.weight" or name.endswith(".spectral.weight")


def check_modes(modes: tuple[int, ...], grid: tuple[int, ...]) -> None:
    """Raise ValueError unless `grid` resolves `modes`.

    Full FFT axes keep modes [:m] and [-m:], which needs 2m <= n; the last (rfft) axis keeps
    [:m] of its n//2 + 1 frequencies, which needs m <= n//2 + 1.
    """
    if len(grid) != len(modes):
        raise ValueError(f"grid {tuple(grid)} has {len(grid)} dims but modes {tuple(modes)} has {len(modes)}")
    full_ok = all(2 * m <= n for m, n in zip(modes[:-1], grid[:-1]))
    rfft_ok = modes[-1] <= grid[-1] // 2 + 1
    if not (full_ok and rfft_ok):
        raise ValueError(
            f"resolution {tuple(grid)} is too coarse for modes {tuple(modes)}: need 2*m <= n on the "
            f"full FFT axes and m <= n//2 + 1 on the last (rfft) axis"
        )


def _corners(modes: tuple[int, ...], grid: tuple[int, ...]):
    """(spectrum slices, weight slices) of each retained corner: on a full axis of n points, frequencies [:m] are
    weight indices [:m] and frequencies [n-m:] weight indices [m:2m]; on the rfft axis [:m] both."""
    full = [((slice(0, m), slice(0, m)), (slice(n - m, n), slice(m, 2 * m))) for m, n in zip(modes[:-1], grid[:-1])]
    last = (slice(0, modes[-1]),)
    for combo in itertools.product(*full):
        yield tuple(c[0] for c in combo) + last, tuple(c[1] for c in combo) + last


def mode_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y[b, o, k] = sum_i x[b, i, k] w[i, o, k] for complex x (B, I, *modes), w (I, O, *modes), as one real batched
    matmul over the modes: [Re x, Im x] (B, 2I) @ [[Re w, Im w], [-Im w, Re w]] (2I, 2O) = [Re y, Im y]. (A complex
    einsum runs CPU bmm as a loop over the modes, a select and a copy per mode.)"""
    b, i, *modes = x.shape
    o, m = w.shape[1], math.prod(modes)
    xm = torch.view_as_real(x).reshape(b, i, m, 2).permute(2, 0, 3, 1).reshape(m, b, 2 * i)
    wm = torch.view_as_real(w).reshape(i, o, m, 2).permute(2, 3, 0, 1)             # (m, re/im, I, O)
    re, im = wm[:, 0], wm[:, 1]
    blocks = torch.cat([torch.cat([re, im], 2), torch.cat([-im, re], 2)], 1)       # (m, 2I, 2O)
    y = torch.bmm(xm, blocks).view(m, b, 2, o).permute(1, 3, 0, 2)                  # (B, O, m, re/im)
    return torch.view_as_complex(y.contiguous()).view(b, o, *modes)


def fft_size(n: int) -> int:
    """The smallest 7-smooth integer (2^a 3^b 5^c 7^d) >= n: sizes pocketfft and cuFFT transform with their fast
    radices. A prime size is several times slower (41 points: 4.8x 42's time per element here, bench/README.md)."""
    m = max(int(n), 1)
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


class SpectralConv(nn.Module):
    """Multiply the lowest `modes` Fourier modes by learned complex weights (rfftn over the last d dims).

    (K v)_o(k) = sum_i R_{i,o}(k) v_i(k) for the retained k, 0 elsewhere (Li et al. 2021, eq. 5).
    Retained k: [:m] and [-m:] on each of the first d-1 axes (2^(d-1) corner blocks) and [:m] on the
    rfft axis. All corners live in one weight tensor of shape (in, out, 2*m_1, ..., 2*m_{d-1}, m_d):
    along a full axis, index j < m is frequency j and index j >= m is frequency j - 2m.
    """

    def __init__(self, in_channels: int, out_channels: int, modes: tuple[int, ...], weights: str = "complex"):
        super().__init__()
        modes = tuple(int(m) for m in modes)
        if not 1 <= len(modes) <= 3 or any(m < 1 for m in modes):
            raise ValueError(f"modes must be 1 to 3 positive ints, got {modes}")
        if weights not in SPECTRAL_WEIGHT_FORMS:
            raise ValueError(f"weights={weights!r}; allowed: {SPECTRAL_WEIGHT_FORMS}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.modes, self.weights_form = modes, weights
        shape = (in_channels, out_channels, *(2 * m for m in modes[:-1]), modes[-1])
        # FNO reference init: scale * rand, real and imaginary parts each U[0, 1).
        w = torch.rand(shape, dtype=torch.cfloat) / (in_channels * out_channels)
        self.weight = nn.Parameter(w if weights == "complex" else torch.view_as_real(w).clone())

    def complex_weight(self) -> torch.Tensor:
        """The weights as a complex tensor (a view for the real form), (in, out, 2m_1, ..., m_d). Real weights cast to
        16 bits by mixed precision (FSDP2's param_dtype) are upcast first: there is no bf16/fp16 complex dtype."""
        if self.weight.is_complex():
            return self.weight
        w = self.weight if self.weight.dtype in (torch.float32, torch.float64) else self.weight.float()
        return torch.view_as_complex(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = len(self.modes)
        if x.ndim != d + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (batch, {self.in_channels}, <{d} grid dims>), got shape {tuple(x.shape)}"
            )
        grid = tuple(x.shape[2:])
        check_modes(self.modes, grid)
        w = self.complex_weight()
        dims = tuple(range(-d, 0))
        # FFT in the weights' precision (also keeps bf16/fp16 activations out of the FFT).
        x_ft = torch.fft.rfftn(x.to(w.real.dtype), dim=dims)  # (B, in, n_1, ..., n_d//2+1)

        # Each retained corner (2^(d-1) of them: [:m] or [-m:] on each full axis, [:m] on the rfft axis) is
        # multiplied in place of a gather: slices are views, so no index_select/cat copies of the spectrum.
        # Slicing the rfft axis first gives backward one full-size gradient of the spectrum, not one per corner.
        low = x_ft[..., : self.modes[-1]]
        y = x_ft.new_zeros(x_ft.shape[0], self.out_channels, *x_ft.shape[2:])
        for spec, wsl in _corners(self.modes, grid):
            y[(..., *spec)] = mode_matmul(low[(..., *spec)], w[(..., *wsl)])
        return torch.fft.irfftn(y, s=grid, dim=dims)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, modes={self.modes}, weights={self.weights_form!r}"


class FNOBlock(nn.Module):
    """One Fourier layer without its activation: K v + W v, W a pointwise (1x1) conv with bias. With `emb_dim` > 0
    a noise embedding modulates it, (K v + W v) (1 + a) + b with (a, b) = Linear(emb) per channel (FiLM, Perez et
    al. 2018; zero-initialised, so the block starts as the plain layer)."""

    def __init__(self, width: int, modes: tuple[int, ...], weights: str = "complex", emb_dim: int = 0):
        super().__init__()
        self.spectral = SpectralConv(width, width, modes, weights)
        self.skip = _CONV[len(modes)](width, width, kernel_size=1)
        self.film = nn.Linear(emb_dim, 2 * width) if emb_dim else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        y = self.spectral(x) + self.skip(x)
        if self.film is None:
            return y
        scale, shift = self.film(emb).to(y.dtype).view(*emb.shape[:1], 2, -1, *(1,) * (y.ndim - 2)).unbind(1)
        return y * (1 + scale) + shift


class FNO(nn.Module):
    """Fourier Neural Operator: lifting -> n_layers Fourier layers -> projection.

    forward: (B, C_in, *grid) -> (B, C_out, *grid), d = len(modes) grid dims, any resolution
    that resolves `modes` (after `padding`).

    `padding` > 0 zero-pads the high side of every axis by at least `padding` points: with fast_padding (default)
    up to the next FFT-friendly size (`fft_size`), n + padding otherwise. padding = 0 pads nothing (periodic data).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        modes: tuple[int, ...] | int,
        width: int = 32,
        n_layers: int = 4,
        lifting_channels: int | None = None,
        projection_channels: int = 128,
        padding: int = 0,
        positional_embedding: bool = True,
        spectral_weights: str = "complex",
        dim: int | None = None,
        emb_dim: int = 0,
        fast_padding: bool = True,
        parametrization: str = "standard",
        base_width: int | None = None,
    ):
        super().__init__()
        if isinstance(modes, int):
            if dim is None:
                raise ValueError(f"modes={modes} is an int, so dim (1, 2 or 3) must be given")
            modes = (modes,) * dim
        modes = tuple(int(m) for m in modes)
        if dim is not None and dim != len(modes):
            raise ValueError(f"dim={dim} disagrees with modes={modes} ({len(modes)} dims)")
        if len(modes) not in _CONV:
            raise ValueError(f"modes={modes} gives {len(modes)} dims; allowed: 1, 2, 3")
        if spectral_weights not in SPECTRAL_WEIGHT_FORMS:
            raise ValueError(f"spectral_weights={spectral_weights!r}; allowed: {SPECTRAL_WEIGHT_FORMS}")
        for name, v in [("in_channels", in_channels), ("out_channels", out_channels), ("width", width),
                        ("n_layers", n_layers), ("projection_channels", projection_channels)]:
            if v < 1:
                raise ValueError(f"{name}={v}; must be >= 1")
        if padding < 0:
            raise ValueError(f"padding={padding}; must be >= 0")
        if lifting_channels is not None and lifting_channels < 1:
            raise ValueError(f"lifting_channels={lifting_channels}; must be None or >= 1")
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization={parametrization!r}; allowed: {PARAMETRIZATIONS}")
        if base_width is not None and base_width < 1:
            raise ValueError(f"base_width={base_width}; must be None or >= 1")

        self.modes, self.dim, self.padding, self.fast_padding = modes, len(modes), padding, fast_padding
        self.in_channels, self.out_channels = in_channels, out_channels
        self.positional_embedding = positional_embedding
        conv = _CONV[self.dim]
        c_lift = in_channels + (self.dim if positional_embedding else 0)
        if lifting_channels is None:
            self.lifting = nn.Sequential(conv(c_lift, width, 1))
        else:
            self.lifting = nn.Sequential(conv(c_lift, lifting_channels, 1), nn.GELU(),
                                         conv(lifting_channels, width, 1))
        self.emb_dim = emb_dim
        self.blocks = nn.ModuleList(FNOBlock(width, modes, spectral_weights, emb_dim) for _ in range(n_layers))
        self.projection = nn.Sequential(conv(width, projection_channels, 1), nn.GELU(),
                                        conv(projection_channels, out_channels, 1))
        # muP relative to base_width; at m = 1 (and under "standard") nothing changes, bit for bit.
        self.parametrization, self.width, self.base_width = parametrization, width, base_width or width
        self.width_mult = width / self.base_width
        self.param_classes = mup_classes(self)   # by name now: an engine may rename storage later (DeepSpeed's)
        if parametrization == "mup" and self.width_mult != 1:
            mup_init_(self)

    def lr_multipliers(self, optimizer: str) -> dict[str, float]:
        """Learning-rate factor per parameter name (the trainer's optimizer hook, trainer/optim.py: lr_groups)."""
        return mup_lr_multipliers(self, optimizer) if self.parametrization == "mup" else {}

    def padded_grid(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """The grid the Fourier layers see for an input grid."""
        if not self.padding:
            return tuple(grid)
        return tuple(fft_size(n + self.padding) if self.fast_padding else n + self.padding for n in grid)

    def grid_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates x_j = i / n_j in [0, 1) per grid axis (periodic convention), (B, d, *grid)."""
        grid = x.shape[2:]
        axes = [torch.arange(n, device=x.device, dtype=x.dtype) / n for n in grid]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (d, *grid)
        return coords.expand(x.shape[0], *coords.shape)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """emb: (B, emb_dim), the noise embedding of a diffusion backbone (required iff emb_dim > 0)."""
        d = self.dim
        if (emb is None) != (self.emb_dim == 0):
            raise ValueError(f"FNO built with emb_dim={self.emb_dim} called with emb={'None' if emb is None else 'a tensor'}")
        if x.ndim != d + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (batch, {self.in_channels}, <{d} grid dims>), got shape {tuple(x.shape)}"
            )
        grid = tuple(x.shape[2:])
        padded = self.padded_grid(grid)
        try:
            check_modes(self.modes, padded)
        except ValueError as e:
            raise ValueError(f"input resolution {grid} with padding={self.padding}: {e}") from None

        if self.positional_embedding:
            x = torch.cat([x, self.grid_embedding(x)], dim=1)
        x = self.lifting(x)  # (B, width, *grid)
        if self.padding:
            # Zero-pad the high side of every grid axis: the domain need not be periodic (Darcy).
            x = F.pad(x, [p for n, m in zip(reversed(grid), reversed(padded)) for p in (0, m - n)])
        for i, block in enumerate(self.blocks):
            x = block(x, emb)
            if i < len(self.blocks) - 1:
                x = F.gelu(x)
        if self.padding:
            x = x[(..., *(slice(0, n) for n in grid))]
        return self.projection(x)


# ---- the maximal-update parametrization (model.fno.parametrization = "mup") --------------------------------------
# Learning-rate factor m ** exponent, m = width / base_width, per class and optimizer (see mup_lr_multipliers).
MUP_LR_EXPONENT = {"adam": {"input": 0, "hidden": -1, "output": -1, "finite": 0},
                   "adamw": {"input": 0, "hidden": -1, "output": -1, "finite": 0},
                   "sgd": {"input": 1, "hidden": 0, "output": -1, "finite": 0}}


def mup_classes(model: FNO) -> dict[str, str]:
    """Each parameter's muP class, by which of its fans grow with the width (a weight's fan_in is the channels it
    reads, its fan_out those it writes; a bias reads a constant: fan_in 1, fan_out its length):
    "input"  fan_out only: the lifting's last conv, FiLM, and every bias of width length (the skip convs');
    "hidden" both: the spectral weights (in, out, modes...), fan_in = in channels, and the skip convs;
    "output" fan_in only: the projection's first conv (width -> projection_channels);
    "finite" neither: the rest of the lifting and projection, whose sizes do not follow `width`."""
    last_lift = f"lifting.{len(model.lifting) - 1}."
    classes = {}
    for name, _ in model.named_parameters():
        if name.startswith(last_lift) or ".film." in name or name.endswith(".skip.bias"):
            classes[name] = "input"
        elif name.endswith((".spectral.weight", ".skip.weight")):
            classes[name] = "hidden"
        else:
            classes[name] = "output" if name == "projection.0.weight" else "finite"
    return classes


def mup_lr_multipliers(model: FNO, optimizer: str) -> dict[str, float]:
    """muP's learning-rate factor per parameter name, m ** e with m = width / base_width.

    muP (Yang & Hu 2021, "Feature Learning in Infinite-Width Neural Networks"; Yang et al. 2022, "Tensor Programs V:
    Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer", Table 3), whose fan sizes are taken here
    relative to the base width, so that m = 1 is the standard parametrization (mup_classes gives the classes):

        class    Table 3: init var   Adam LR        SGD LR          here: init          Adam LR   SGD LR
        input    1/fan_in            eta            eta fan_out     unchanged           x 1       x m
        hidden   1/fan_in            eta / fan_in   eta             ~ 1/fan_in          x 1/m     x 1
        output   1/fan_in^2          eta / fan_in   eta / fan_in    variance x 1/m      x 1/m     x 1/m
        finite   -                   eta            eta             unchanged           x 1       x 1

    Table 3 puts all biases with the input weights: their init is Theta(1) in the width (mup_init_) and their LR is
    the input class's. Table 8 writes the same parametrization with a 1/fan_in multiplier in the output layer's
    forward and its Adam LR unchanged; here that multiplier is folded into the output weight's init and LR. Not
    scaled: weight decay (AdamW decays by lr x weight_decay, so a hidden weight's decay per step falls as 1/m; the
    `mup` package's MuAdamW multiplies weight_decay by m there) and Adam's eps.
    """
    if optimizer not in MUP_LR_EXPONENT:
        raise ValueError(f"model.fno.parametrization = 'mup' has learning-rate rules for optim.name in "
                         f"{', '.join(map(repr, MUP_LR_EXPONENT))}; got {optimizer!r}")
    exponent = MUP_LR_EXPONENT[optimizer]
    return {name: model.width_mult ** exponent[c] for name, c in model.param_classes.items()}


@torch.no_grad()
def mup_init_(model: FNO) -> None:
    """Turn the standard init, drawn at this width, into muP's (Table 3's init column, anchored at base_width n0, so
    m = 1 changes nothing). No random numbers are drawn: a model's draws are those of the standard one.
    - hidden: torch's conv init already has variance 1/(3 fan_in). The spectral weights' reference init U[0,1)/(in out),
      real and imaginary parts, has mean 1/(2 n^2) and std 1/(sqrt(12) n^2) at width n: its mean is rescaled to
      vary as 1/fan_in and its fluctuation as 1/sqrt(fan_in), from their values at n0, so each moves the next layer
      by the same amount at every width (a 1/sqrt(fan_in) mean would grow as sqrt(n)).
    - output: variance x 1/m (~ 1/fan_in^2).
    - biases of layers that read the width (torch draws them U(+-1/sqrt(fan_in))): x sqrt(m), Theta(1) as Table 3 says.
    - input weights, FiLM (zero) and finite layers: unchanged."""
    m, n, n0 = model.width_mult, model.width, model.base_width
    for block in model.blocks:
        w = block.spectral.weight
        u = (torch.view_as_real(w) if w.is_complex() else w)      # U[0,1) / n^2, viewed in place
        u.copy_((0.5 / m + (u * (n * n) - 0.5) / math.sqrt(m)) / (n0 * n0))
        block.skip.bias.mul_(math.sqrt(m))
    model.projection[0].weight.mul_(1 / math.sqrt(m))
    model.projection[0].bias.mul_(math.sqrt(m))


@torch.no_grad()
def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy all parameters and buffers of `src` into `dst` by name, converting spectral weights
    between the complex and real-with-trailing-2 forms where the two models differ."""
    src_state = src.state_dict()
    dst_state = dst.state_dict()
    if src_state.keys() != dst_state.keys():
        raise ValueError(f"state keys differ: {sorted(src_state.keys() ^ dst_state.keys())}")
    for name, t in dst_state.items():
        s = src_state[name]
        if s.is_complex() and not t.is_complex():
            s = torch.view_as_real(s)
        elif t.is_complex() and not s.is_complex():
            s = torch.view_as_complex(s.contiguous())
        if s.shape != t.shape:
            raise ValueError(f"{name}: shape {tuple(s.shape)} cannot be copied into {tuple(t.shape)}")
        t.copy_(s)


# ---- registration (trainer/registry.py) ------------------------------------------------------------------------
@dataclass
class FNOConfig:
    """[model.fno]"""
    width: int = 32
    modes: list = field(default_factory=lambda: [12, 12])
    n_layers: int = 4
    padding: int = 0
    projection_channels: int = 128
    spectral_weights: str = "complex"   # "real" stores them as (..., 2) float tensors
    fast_padding: bool = True           # padding is a minimum: pad up to an FFT-friendly size (fno.fft_size)
    parametrization: str = "standard"   # "mup": maximal-update init and per-parameter LRs (mup_lr_multipliers)
    base_width: int = 0                 # the width at which "mup" is "standard" (0: `width`)

    def __post_init__(self):
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"config key 'model.fno.parametrization' = {self.parametrization!r}; allowed: "
                             f"{', '.join(map(repr, PARAMETRIZATIONS))}")
        if self.base_width < 0:
            raise ValueError(f"config key 'model.fno.base_width' = {self.base_width!r}; must be >= 1 (or 0: the width)")
        self.base_width = self.base_width or self.width
        if self.spectral_weights not in SPECTRAL_WEIGHT_FORMS:
            raise ValueError(f"config key 'model.fno.spectral_weights' = {self.spectral_weights!r}; allowed: "
                             f"{', '.join(map(repr, SPECTRAL_WEIGHT_FORMS))}")
        if not self.modes or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in self.modes):
            raise ValueError(f"config key 'model.fno.modes' = {self.modes!r}; must be a list of positive ints")
        for k in ("width", "n_layers", "projection_channels"):
            if getattr(self, k) <= 0:
                raise ValueError(f"config key 'model.fno.{k}' = {getattr(self, k)!r}; must be > 0")
        if self.padding < 0:
            raise ValueError(f"config key 'model.fno.padding' = {self.padding!r}; must be >= 0")


def _check(cfg: FNOConfig, data: DataSpec) -> None:
    grid = data.input_shape[1:]
    if len(cfg.modes) != len(grid):
        raise ValueError(f"config key 'model.fno.modes' = {cfg.modes} has {len(cfg.modes)} entries; the dataset has a "
                         f"{len(grid)}-D grid {tuple(grid)}")


def _build(cfg, data: DataSpec) -> FNO:
    return _backbone(cfg, data.input_shape[0], data.target_shape[0], 0)


def _backbone(cfg, in_channels: int, out_channels: int, emb_dim: int) -> FNO:
    return FNO(in_channels, out_channels, tuple(cfg.modes), width=cfg.width, n_layers=cfg.n_layers,
               padding=cfg.padding, projection_channels=cfg.projection_channels, spectral_weights=cfg.spectral_weights,
               emb_dim=emb_dim, fast_padding=cfg.fast_padding, parametrization=cfg.parametrization,
               base_width=cfg.base_width)


register_model(ModelSpec(
    name="fno", config=FNOConfig, check=_check, build=_build, loss=operator_loss, evaluate=operator_errors,
    example_batch=operator_example_batch, backbone=_backbone,
    shard_units=lambda model: [model.lifting, *model.blocks, model.projection]))

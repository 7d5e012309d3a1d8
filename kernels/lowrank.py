"""PowerSGD's decode, approx = P Q^H, and its Q^H = P^H M, as sums of rank-one terms added in a fixed order.

A matmul's summation order is its BLAS library's, and for these skinny shapes MKL is slow here (the benchmark FNO's
decodes: 0.9-1.0 ms with MKL, 0.43-0.48 ms with the C loop; its Q^H products 0.69-0.79 against 0.52-0.58 ms; one
thread, interleaved repeats). So the product is defined as
    out = t_0 + t_1 + ... + t_{r-1},   t_j = P[:, j] QH[j, :]      (left to right, each term rounded),
with complex terms in real arithmetic, t = (a c - b d, a d + b c) for P[i, j] = a + bi and QH[j, k] = c + di.
The torch reference below and the C loop (kernels/native.py, ft_lowrank) compute exactly these float32 operations,
so they agree to the bit; `FusedKernel` checks it before first use.
"""

from __future__ import annotations

import torch

from kernels import fused, native


def _planes(P: torch.Tensor, QH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef, A) as the C loop reads them: P as (n, r) or (n, r, 2) (a, b) pairs, QH as (r, m) or (r, 2m) floats."""
    if not P.is_complex():
        return P.contiguous(), QH.contiguous()
    return (torch.view_as_real(P.resolve_conj()).contiguous(),
            torch.view_as_real(QH.resolve_conj()).contiguous().view(QH.shape[0], -1))


def _check(P: torch.Tensor, QH: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if P.dim() != 2 or QH.dim() != 2 or P.shape[1] != QH.shape[0] or P.dtype != QH.dtype \
            or P.dtype not in (torch.float32, torch.complex64):
        raise ValueError(f"lowrank_product: P {tuple(P.shape)} {P.dtype} and QH {tuple(QH.shape)} {QH.dtype}; "
                         "expected (n, r) and (r, m) of one dtype, float32 or complex64")
    shape = (P.shape[0], QH.shape[1])
    if out is None:
        return torch.empty(shape, dtype=P.dtype, device=P.device)
    if out.shape != shape or out.dtype != P.dtype:
        raise ValueError(f"lowrank_product: out is {tuple(out.shape)} {out.dtype}, expected {shape} {P.dtype}")
    return out


def _reference(P: torch.Tensor, QH: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _check(P, QH, out)
    coef, A = _planes(P, QH)
    if P.is_complex():
        a, b = coef[..., 0], coef[..., 1]                      # (n, r)
        c, d = A.view(A.shape[0], -1, 2).unbind(-1)            # (r, m)
    acc = None
    for j in range(coef.shape[1]):
        if P.is_complex():
            t = torch.stack([a[:, j, None] * c[j] - b[:, j, None] * d[j], a[:, j, None] * d[j] + b[:, j, None] * c[j]],
                            dim=-1)
        else:
            t = coef[:, j, None] * A[j]
        acc = t if acc is None else acc + t
    flat = torch.view_as_real(out) if out.is_complex() else out
    if acc is None:
        flat.zero_()
    else:
        flat.copy_(acc.view(flat.shape))
    return out


def _fast(P: torch.Tensor, QH: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _check(P, QH, out) if out is None else out     # lowrank_product checked a given out already
    flat = torch.view_as_real(out) if out.is_complex() else out
    if P.shape[1] == 0 or not native.usable(flat, QH):
        return _reference(P, QH, out)
    coef, A = _planes(P, QH)
    native.lowrank(coef, A, P.is_complex(), flat)
    return out


def _example(dtype: torch.dtype):
    def make(device: torch.device) -> tuple:
        g = torch.Generator().manual_seed(7)
        P, QH = torch.randn(5, 3, generator=g, dtype=dtype), torch.randn(3, 2053, generator=g, dtype=dtype)
        P[0, 0] = -0.0                  # signed zeros: the first term is not added to a zero
        return P.to(device), QH.to(device)
    return make


_REAL = fused.FusedKernel("lowrank_product (real)", _fast, _reference, _example(torch.float32), min_numel=0)
_COMPLEX = fused.FusedKernel("lowrank_product (complex)", _fast, _reference, _example(torch.complex64), min_numel=0)


def lowrank_product(P: torch.Tensor, QH: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """P @ QH (P (n, r), QH (r, m), float32 or complex64) summed term by term (module docstring), into `out` (a
    contiguous (n, m) tensor of P's dtype) or a new tensor."""
    out = _check(P, QH, out)      # here, not inside the kernel: FusedKernel takes a failing fast path for a broken
    return (_COMPLEX if P.is_complex() else _REAL)(P, QH, out)      # compiler and falls back for good


# Low-precision products (`comm.powersgd.compute = "bfloat16"`). A complex matrix M (n, m) is read in its real form
# Mr = view_as_real(M) as (n, 2m), (re, im) pairs interleaved, and each complex product is one real matmul of the same
# 4nmr real multiply-adds with a small real-form partner built from P or Q. The matmul takes `dtype` inputs,
# accumulates in float32 and rounds its result to `dtype` (bfloat16 on CPU: oneDNN's AVX512-BF16 kernels, 4x the
# float32 rate here); results come back as float32/complex64. With dtype=float32 the same code is plain float32
# arithmetic in another order, which is how the tests check the real-form algebra.

def real_form(M: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """M (n, m), real or complex, as an (n, m) or (n, 2m) real matrix of `dtype` (a copy)."""
    return (torch.view_as_real(M) if M.is_complex() else M).reshape(M.shape[0], -1).to(dtype)


def project(Mr: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """P = M Q for M given as `real_form(M)`, Q (m, r) real or complex: (n, r) float32 or complex64.
    Complex: [Re P, Im P] interleaved = Mr B, B (2m, 2r) with B[2k, 2j:2j+2] = (Re Q, Im Q)[k, j] and
    B[2k+1, 2j:2j+2] = (-Im Q, Re Q)[k, j]."""
    if not Q.is_complex():
        return (Mr @ Q.to(Mr.dtype)).float()
    re, im = Q.real, Q.imag
    B = torch.stack([torch.stack([re, im], -1), torch.stack([-im, re], -1)], 1)      # (m, 2, r, 2)
    Pr = (Mr @ B.reshape(2 * Q.shape[0], 2 * Q.shape[1]).to(Mr.dtype)).float()       # (n, 2r)
    return torch.view_as_complex(Pr.view(Pr.shape[0], -1, 2))


def coproject(P: torch.Tensor, Mr: torch.Tensor) -> torch.Tensor:
    """Q^H = P^H M for P (n, r) and M given as `real_form(M)`: (r, m) float32 or complex64.
    Complex: R = [Re P^T; Im P^T] Mr (2r, 2m); Re Q^H = Re P^T Re M + Im P^T Im M,
    Im Q^H = Re P^T Im M - Im P^T Re M."""
    if not P.is_complex():
        return (P.mT.to(Mr.dtype) @ Mr).float()
    r = P.shape[1]
    C = torch.view_as_real(P.resolve_conj()).permute(2, 1, 0).reshape(2 * r, -1).to(Mr.dtype)   # (2r, n)
    R = (C @ Mr).float().view(2, r, -1, 2)           # [Re P^T | Im P^T] x [Re M | Im M]
    return torch.complex(R[0, ..., 0] + R[1, ..., 1], R[0, ..., 1] - R[1, ..., 0])


def expand(P: torch.Tensor, QH: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """approx = P Q^H in real form, float32 (n, m) or (n, 2m) (the (re, im) layout of a complex (n, m)), computed in
    `dtype` (converted once here: the callers' strided copies and subtractions run 1.7x slower from bfloat16).
    Complex: [Re P, Im P] (n, 2r) times D (2r, 2m) with D's rows j = (Re, Im) Q^H[j] interleaved and rows r + j =
    (-Im, Re) Q^H[j] interleaved."""
    if not P.is_complex():
        return (P.to(dtype) @ QH.to(dtype)).float()
    n, r = P.shape
    re, im = QH.real, QH.imag
    D = torch.cat([torch.stack([re, im], -1), torch.stack([-im, re], -1)]).reshape(2 * r, -1)      # (2r, 2m)
    left = torch.view_as_real(P.resolve_conj()).permute(0, 2, 1).reshape(n, 2 * r)               # [Re P | Im P]
    return (left.to(dtype) @ D.to(dtype)).float()

"""PowerSGD: rank-r gradient approximation by one warm-started power iteration per step.

Vogels, Karimireddy, Jaggi 2019, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization", Algorithm 1, for every parameter viewed as a matrix M (n x m):

    M  = grad + e                       error feedback, local per parameter (if cfg.error_feedback)
    P  = M Q;       allreduce P         (sum; the scale is irrelevant, P is orthonormalised next)
    P  = orth(P)                        reduced QR (Householder) of the summed P: stable, and a zero P
                                        gives orthonormal columns rather than NaN as Gram-Schmidt would
    Q  = M^H P;     allreduce Q / W     Q is replicated, kept for the next step's warm start (computed as
                                        Q^H = P^H M, the faster product and approx's layout)
    approx = P Q^H = P P^H mean_j M_j;  e = M - approx

Since the averaged P and Q are linear in the M_j, the result is exact whenever mean_j M_j has rank
<= r (and the warm-started Q is generic). One bucket costs three allreduces, always in this order:
every uncompressed tensor concatenated, every P, every Q. A tensor is sent uncompressed when it is
1-D or when r (n + m) min_compression_rate >= n m, r = min(rank, n, m) (torch's powerSGD_hook rule,
`powersgd_matrix`).

With `q_wire = "bfloat16"` the Q allreduce (nearly all of the bytes: m >> n for FNO weights) travels as bfloat16:
each rank's Q^H and the sum are rounded to 8 significant bits (relative 2^-8 each), every rank applies the same
rounded Q, and error feedback keeps what the rounding lost (e = M - approx with the approx actually applied), so
it is an error of this step only, as the rank truncation is. `p_wire = "bfloat16"` does the same for P (n r per
matrix: most of the bytes in the balanced view, where n > m): every rank orthonormalises the same rounded sum, so
approx = P P^H mean_j M_j is still a projection, onto a subspace tilted by the rounding; for a mean of rank <= r its
relative error is at most |dP| / |P| times cond(P) (the rest goes to error feedback). The uncompressed tensors
then take an allreduce of their own.

Matrix view (`cfg.powersgd.view`): "first" is the first dim x the rest (torch's hook; conv weights as (out, in k k)).
"balanced" splits the axes into rows (the first axis and others) and columns, keeping their order, so that n + m,
the floats per rank, is smallest (`matrix_axes`): an FNO spectral weight (in, out, kx, ky) = (32, 32, 24, 12) becomes
(in kx, out ky) = 768 x 384, 1,152 complex per rank against (in, out kx ky)'s 9,248. Measured on the demo FNO's
gradients (40-200 Adam steps, truncated SVD), the relative error at rank r is about the same in either view
(r 4: 0.10-0.24, r 8: 0.04-0.12), so at equal bytes the balanced view carries 8x the rank. A permuted view costs one
pass each way, fused with error feedback, whose residual stays in the matrix layout: M = permute(g) + e in one
pass; approx permuted back out; e = M - approx in M's own storage.
`compute = "bfloat16"` runs the three products with bfloat16 inputs, float32 accumulation and bfloat16 results
(`kernels.lowrank.project/coproject/expand`, complex products as real matmuls of the interleaved real form): on a CPU
with AVX512-BF16 (and on GPUs) 4x the float32 rate. Each product's error is at most (2u + u^2) |A| |B| + u |AB|
(elementwise, u = 2^-8: both inputs and the result rounded); P is orthonormalised in float32; the decode is the same
rounded product on every rank, and error feedback keeps what the rounding lost (e = M - approx, M in float32).
Complex parameters (FNO spectral weights (in, out, m1, m2)) by
`cfg.powersgd.complex`: "real_view" compresses the interleaved float32 (in, out*m1*m2*2) matrix (a
complex rank-r matrix is a real rank-2r one there); "complex" keeps M complex (in, out*m1*m2) with
complex P, Q, conjugate transposes and a complex QR, and ships their real views.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch

from kernels import lowrank_product
from kernels.lowrank import coproject, expand, project, real_form
from trainer.compress.base import Compressor, GradientPlan, ParamView, mixed_seed, timed


@functools.lru_cache(maxsize=None)
def matrix_axes(shape: tuple[int, ...], view: str) -> tuple[tuple[int, ...], int]:
    """(perm, k): a tensor of `shape` is compressed as the matrix tensor.permute(perm) with its first k axes as rows.
    "first": (0, 1, ...), k = 1. "balanced": rows are axis 0 plus the subset of the other axes, each group in its
    original order, that makes n + m smallest (n m is fixed: n nearest sqrt(n m)); the first such subset by bitmask."""
    d = len(shape)
    if view == "first" or d <= 2:
        return tuple(range(d)), 1
    best = None
    for mask in range(2 ** (d - 1) - 1):          # not every axis in the rows: the columns must be non-empty
        rows = [0] + [a for a in range(1, d) if mask >> (a - 1) & 1]
        cols = [a for a in range(1, d) if a not in rows]
        cost = math.prod(shape[a] for a in rows) + math.prod(shape[a] for a in cols)
        if best is None or cost < best[0]:
            best = (cost, tuple(rows + cols), len(rows))
    return best[1], best[2]


def powersgd_matrix(shape: tuple[int, ...], is_complex: bool, cfg, real_view: bool | None = None,
                    view: str | None = None) -> tuple[int, int, int, bool] | None:
    """(n, m, r, complex): the matrix a parameter of `shape` is compressed as and its rank
    r = min(cfg.powersgd.rank, n, m), or
    None when it is sent uncompressed: 1-D, or r (n + m) * min_compression_rate >= n m (torch's powerSGD_hook rule).
    The one home of this rule: the compressor, `auto`'s cost model and the byte count of torch's hook all use it.
    `real_view` overrides cfg.powersgd.complex and `view` cfg.powersgd.view (torch's hook sees complex gradients as
    real views, first dim x the rest). A real view of a complex tensor keeps the (re, im) pairs in the columns."""
    if len(shape) < 2:
        return None
    if real_view is None:
        real_view = cfg.powersgd.complex == "real_view"
    perm, k = matrix_axes(tuple(shape), cfg.powersgd.view if view is None else view)
    cplx = is_complex and not real_view
    n = math.prod(shape[a] for a in perm[:k])
    m = math.prod(shape) * (2 if is_complex else 1) // n // (2 if cplx else 1)
    r = min(cfg.powersgd.rank, n, m)
    if r * (n + m) * cfg.powersgd.min_compression_rate >= n * m:
        return None
    return n, m, r, cplx


def powersgd_floats(n: int, m: int, r: int, cplx: bool) -> tuple[int, int]:
    """float32 elements of P (n x r) and Q (m x r) as allreduced (complex entries as two floats)."""
    return n * r * (2 if cplx else 1), m * r * (2 if cplx else 1)


class PowerSGDCompressor(Compressor):
    """Rank-`cfg.powersgd.rank` PowerSGD with error feedback and warm start; see the module docstring."""

    name = "powersgd"
    error_feedback = True
    cost_model = True

    @classmethod
    def collectives(cls, cfg, plan: GradientPlan, w: int) -> list[tuple[str, float]]:
        """Two allreduces: the P's with the uncompressed tensors riding along, then the Q's; with P in bfloat16 the
        uncompressed tensors go first in an allreduce of their own."""
        p_floats, q_floats = sum(p for p, _ in plan.matrices), sum(q for _, q in plan.matrices)
        q = ("allreduce", (2 if cfg.powersgd.q_wire == "bfloat16" else 4) * q_floats)
        if cfg.powersgd.p_wire == "bfloat16":
            return ([("allreduce", 4 * plan.n_small)] if plan.n_small else []) + [("allreduce", 2 * p_floats), q]
        return [("allreduce", 4 * plan.n_small + 4 * p_floats), q]

    @classmethod
    def encode_seconds(cls, cfg, n: int) -> float:
        """One square-ish matrix of n floats: P = orth(M Q), Q = M^T P."""
        m, dtype = max(1, int(math.sqrt(n))), getattr(torch, cfg.powersgd.compute)
        mat, q = torch.randn(m, m).to(dtype), torch.randn(m, cfg.powersgd.rank).to(dtype)
        return timed(lambda: mat.T @ torch.linalg.qr((mat @ q).float()).Q.to(dtype))

    def matrix_shape(self, v: ParamView) -> tuple[int, int, bool] | None:
        """(n, m, complex) of the matrix `v` is compressed as, or None to send it uncompressed."""
        matrix = powersgd_matrix(v.shape, v.is_complex, self.cfg)
        return None if matrix is None else (matrix[0], matrix[1], matrix[3])

    def _perm(self, v: ParamView) -> tuple[int, ...] | None:
        """The axis permutation of `v`'s matrix view, or None when it is the identity (the matrix is a view of x)."""
        perm = matrix_axes(tuple(v.shape), self.cfg.powersgd.view)[0]
        return None if perm == tuple(range(len(perm))) else perm

    @staticmethod
    def _permuted(flat: torch.Tensor, v: ParamView, perm: tuple[int, ...]) -> torch.Tensor:
        """A bucket slice as the parameter's float32 tensor (a complex one with a trailing (re, im) axis) with its
        axes in `perm` order: a strided view, no copy, at any storage offset."""
        if v.is_complex:
            return flat.view(*v.shape, 2).permute(*perm, len(perm))
        return flat.view(v.shape).permute(perm)

    def _permuted_matrix(self, g: torch.Tensor, e: torch.Tensor | None, v: ParamView, perm, n: int, m: int,
                         cplx: bool) -> torch.Tensor:
        """M = g + e in the permuted matrix view, in one pass into a new contiguous tensor (n, m); e, the residual,
        is kept in that layout (`_write_permuted`): one of another shape (another view's, or none) is not added."""
        gp = self._permuted(g, v, perm)
        M = torch.empty(gp.shape, dtype=g.dtype, device=g.device)
        if e is None or e.shape != gp.shape:
            M.copy_(gp)
        else:
            torch.add(gp, e, out=M)
        return torch.view_as_complex(M).view(n, m) if cplx else M.view(n, m)

    def _write_permuted(self, approx: torch.Tensor, M: torch.Tensor | None, out: torch.Tensor, v: ParamView,
                        perm: tuple[int, ...]) -> torch.Tensor | None:
        """out (the bucket's slice) = approx, an (n, m) matrix of `_permuted_matrix`'s view (or its real form),
        permuted back; with M, returns the residual e = M - approx, computed in M's own storage (the matrix layout,
        contiguous)."""
        target = self._permuted(out, v, perm)
        flat = (torch.view_as_real(approx) if approx.is_complex() else approx).reshape(target.shape)
        target.copy_(flat)
        if M is None:
            return None
        e = (torch.view_as_real(M) if M.is_complex() else M).view(target.shape)
        return e.sub_(flat)      # shaped as permuted: a residual of another layout never matches

    def _warm_q(self, v: ParamView, m: int, r: int, cplx: bool, device: torch.device) -> torch.Tensor:
        """Last step's Q, or a Gaussian one from a generator seeded by (seed, name): the same on every rank."""
        dtype = torch.complex64 if cplx else torch.float32
        q = self.get(v.name + "/q", local=False)
        if q is not None and q.shape == (m, r) and q.dtype == dtype:
            return q
        g = torch.Generator(device=device)
        g.manual_seed(mixed_seed(getattr(self, "seed", 0), zlib.crc32(v.name.encode())))
        return torch.randn(m, r, generator=g, dtype=dtype, device=device)

    def _allreduce(self, mats: list[torch.Tensor], wire: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Sum a list of (real or complex) matrices over ranks with one allreduce of their float32 views (sent as
        `wire`, summed back in float32). The complex ones go first, so each starts at an even offset and is
        returned as a complex view of the buffer, no copy."""
        order = sorted(range(len(mats)), key=lambda i: not mats[i].is_complex())
        real = [torch.view_as_real(t) if t.is_complex() else t for t in mats]
        flat = torch.cat([real[i].reshape(-1) for i in order])
        if wire == torch.float32:
            flat = self.transport.allreduce_(flat)
        else:
            flat = self.transport.allreduce_(flat.to(wire)).float()
        out: list[torch.Tensor] = [flat] * len(mats)
        for i, part in zip(order, flat.split([real[i].numel() for i in order])):
            part = part.view(real[i].shape)
            out[i] = torch.view_as_complex(part) if mats[i].is_complex() else part
        return out

    def exchange(self, grad: torch.Tensor, views: list[ParamView]) -> torch.Tensor:
        W, ef = self.transport.world_size, self.cfg.error_feedback
        shapes = [self.matrix_shape(v) for v in views]
        dense = [v for v, s in zip(views, shapes) if s is None]
        low_rank = [(v, s) for v, s in zip(views, shapes) if s is not None]

        dense_flat = torch.cat([v.slice(grad) for v in dense]) if dense else grad.new_zeros(0)
        if not low_rank:
            self.transport.allreduce_(dense_flat).div_(W)
            for v, part in zip(dense, dense_flat.split([v.numel for v in dense])):
                v.slice(grad).copy_(part)
            return grad

        xs, perms, Ms, Qs = [], [], [], []
        for v, (n, m, cplx) in low_rank:
            g = v.slice(grad)
            e = self.get(v.name + "/e") if ef else None
            perms.append(self._perm(v))
            if perms[-1] is not None:                   # a permuted copy of g + e: M is this step's own tensor
                x = None
                Ms.append(self._permuted_matrix(g, e, v, perms[-1], n, m, cplx))
            else:
                if e is not None and e.shape == g.shape:
                    x = g + e                           # this step's own tensor: it becomes the residual
                elif ef or (v.is_complex and g.storage_offset() % 2):
                    x = g.clone()                       # (a complex view needs an even storage offset)
                else:
                    x = g                               # read-only until every P and Q is computed
                Ms.append(torch.view_as_complex(x.view(-1, 2)).view(n, m) if cplx else x.view(n, m))
            xs.append(x)
            Qs.append(self._warm_q(v, m, min(self.cfg.powersgd.rank, n, m), cplx, grad.device))

        # The uncompressed tensors ride along with the P's: two allreduces per bucket, not three.
        # P = M Q as (Q^T M^T)^T: the same bits, and MKL's kernel for that layout is ~25% faster for these skinny
        # products (complex 32 x 9216 by 9216 x 4: 0.20 against 0.26 ms)
        lowp = getattr(torch, self.cfg.powersgd.compute) if self.cfg.powersgd.compute != "float32" else None
        Mrs = [real_form(M, lowp) for M in Ms] if lowp else Ms
        if lowp:
            Ps = [project(Mr, Q) for Mr, Q in zip(Mrs, Qs)]
        else:
            Ps = [(Q.mT @ M.mT).mT for M, Q in zip(Ms, Qs)]                          # (n, r) each
        if self.cfg.powersgd.p_wire == "float32":
            summed = self._allreduce([dense_flat] + Ps)
            dense_sum, Ps = summed[0].div_(W), summed[1:]
        else:          # bfloat16 P: the uncompressed tensors cannot ride along (the same collectives on every rank)
            dense_sum = self.transport.allreduce_(dense_flat).div_(W) if dense_flat.numel() else dense_flat
            Ps = self._allreduce(Ps, torch.bfloat16)
        for v, part in zip(dense, dense_sum.split([v.numel for v in dense])):
            v.slice(grad).copy_(part)
        Ps = [torch.linalg.qr(P).Q for P in Ps]
        # Q^H = P^H M, (r, m) each, already in the layout of approx = P Q^H: the n rows of M as n rank-one terms
        # (kernels.lowrank_product: one read of M, a fixed summation order; 20% faster than MKL's product here)
        QHs = self._allreduce([coproject(P, Mr) if lowp else lowrank_product(P.mH, Mr) for Mr, P in zip(Mrs, Ps)],
                              getattr(torch, self.cfg.powersgd.q_wire))

        for (v, _), x, M, perm, P, QH in zip(low_rank, xs, Ms, perms, Ps, QHs):
            QH = QH.div_(W) if W > 1 else QH            # our own slice of the allreduced buffer
            out = v.slice(grad)                         # approx = P Q^H straight into the bucket, summed in
            if perm is not None:                        # the product, permuted back; e = M - approx in one pass
                approx = expand(P, QH, lowp) if lowp else lowrank_product(P, QH)
                e = self._write_permuted(approx, M if ef else None, out, v, perm)
                if ef:
                    self.put(v.name + "/e", e)
            elif lowp:                                  # the real form is the bucket's own (re, im) layout
                out.view(P.shape[0], -1).copy_(expand(P, QH, lowp))
            elif not P.is_complex():                    # kernels.lowrank_product's fixed order
                lowrank_product(P, QH, out=out.view(P.shape[0], -1))
            elif out.storage_offset() % 2 == 0:
                lowrank_product(P, QH, out=torch.view_as_complex(out.view(-1, 2)).view(P.shape[0], -1))
            else:
                out.copy_(torch.view_as_real(lowrank_product(P, QH)).reshape(-1))
            if ef and perm is None:
                self.put(v.name + "/e", x.sub_(out))    # e = M - approx, in x's own storage
            self.put(v.name + "/q", QH.mH.resolve_conj(), local=False)     # Q (m, r), a transposed view
        return grad

"""Blocking collectives for compressors, over torch.distributed or over MPI (mpi4py).

Both sum (never average) and keep tensors on their device; the MPI transport stages through host
memory. Open MPI has no fp16 or bf16 reduction, so their allreduce over MPI gathers and sums in fp32 (with two
ranks that is bit-identical to gloo's a + b).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class TorchTransport:
    name = "torch"

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.stack(out)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        assert t.shape[0] == self.world_size, f"all_to_all wants (world, m) rows, got {tuple(t.shape)}"
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=self.group)
        return out

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """src: a rank of this transport's group."""
        dist.broadcast(t, group=self.group, group_src=src)
        return t

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        """t (world, m) -> (m,): the sum over ranks of row `rank` (reduce_scatter_single: the non-deprecated path)."""
        assert t.dim() == 2 and t.shape[0] == self.world_size, \
            f"reduce_scatter wants (world, m) rows, got {tuple(t.shape)}"
        out = torch.empty(t.shape[1], dtype=t.dtype, device=t.device)
        dist.reduce_scatter_single(out, t.reshape(-1), group=self.group)     # gloo wants the concatenated (W*m,) form
        return out


class MPITransport:
    name = "mpi"

    def __init__(self):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        if dist.is_initialized() and (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world_size):
            raise ValueError(f"comm.transport = 'mpi': MPI rank {self.rank}/{self.world_size} differs from "
                             f"torch.distributed rank {dist.get_rank()}/{dist.get_world_size()}; launch with mpirun")

    @staticmethod
    def _host(t: torch.Tensor):
        return t.detach().cpu().contiguous()

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype in (torch.float16, torch.bfloat16):
            summed = self.allgather(t).float().sum(0)
            return t.copy_(summed)
        h = self._host(t)
        self.comm.Allreduce(self.MPI.IN_PLACE, h.numpy(), op=self.MPI.SUM)
        return t.copy_(h)

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        h = self._host(t)
        out = torch.empty((self.world_size, *h.shape), dtype=h.dtype)
        self.comm.Allgather(h.view(torch.uint8).numpy(), out.view(torch.uint8).numpy())
        return out.to(t.device)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        assert t.shape[0] == self.world_size, f"all_to_all wants (world, m) rows, got {tuple(t.shape)}"
        h = self._host(t)
        out = torch.empty_like(h)
        self.comm.Alltoall(h.view(torch.uint8).numpy(), out.view(torch.uint8).numpy())
        return out.to(t.device)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        h = self._host(t)
        self.comm.Bcast(h.view(torch.uint8).numpy(), root=src)
        return t.copy_(h)

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        """t (world, m) -> (m,): the sum over ranks of row `rank`. MPI has no fp16/bf16 sum: all_to_all, then
        sum in fp32 in rank order."""
        assert t.dim() == 2 and t.shape[0] == self.world_size, \
            f"reduce_scatter wants (world, m) rows, got {tuple(t.shape)}"
        if t.dtype in (torch.float16, torch.bfloat16):
            return self.all_to_all(t).float().sum(0).to(t.dtype)
        h = self._host(t)
        out = torch.empty(h.shape[1], dtype=h.dtype)
        self.comm.Reduce_scatter_block(h.numpy(), out.numpy(), op=self.MPI.SUM)
        return out.to(t.device)


class LocalTransport:
    """World size 1, no communication: a compressor's own encode/decode work, timed alone (its cost model, the codec
    benchmark)."""
    name, rank, world_size = "local", 0, 1

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        return t[0]


def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring allreduce of `nbytes` (reduce-scatter + allgather)."""
    return 2 * (world_size - 1) * nbytes // world_size


class CountingTransport:
    """Wraps a transport and counts the bytes this rank puts on the wire, by the usual algorithms:
    ring allreduce 2(W-1)/W b, all_to_all (W-1)/W b, allgather (W-1) b (b = this rank's part), broadcast b
    from the root. Counting wire bytes (not payload) makes collectives of different kinds comparable."""

    def __init__(self, inner):
        self.inner = inner
        self.rank, self.world_size, self.name = inner.rank, inner.world_size, inner.name
        self.bytes_sent = 0
        self.link = None   # (alpha s, beta s/byte) once trainer/compress/auto.py has measured it

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes_sent += ring_allreduce_bytes(t.numel() * t.element_size(), self.world_size)
        return self.inner.allreduce_(t)

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes_sent += (self.world_size - 1) * t.numel() * t.element_size()
        return self.inner.allgather(t)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes_sent += (self.world_size - 1) * t.numel() * t.element_size() // self.world_size
        return self.inner.all_to_all(t)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.bytes_sent += t.numel() * t.element_size() if self.rank == src else 0
        return self.inner.broadcast_(t, src)

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:   # like all_to_all: (W-1)/W of the (W, m) buffer
        self.bytes_sent += (self.world_size - 1) * t.numel() * t.element_size() // self.world_size
        return self.inner.reduce_scatter(t)


def make_transport(name: str) -> CountingTransport:
    return CountingTransport(MPITransport() if name == "mpi" else TorchTransport())

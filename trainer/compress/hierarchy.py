"""`comm.hierarchy = "node"`: reduce inside each node in full precision, compress only between nodes.

Real clusters join the ranks of a node by a fast link (NVLink, shared memory) and nodes by a slow one. For each
gradient bucket, under DDP (trainer/comm.py):

    1. node:    allreduce (fp32 sum) over the node's ranks, then / ranks per node     -> the node's mean
    2. leaders: the configured compressor's exchange over one rank per node (its local rank 0), which averages the
                node means: the mean over all ranks, as the flat exchange computes it
    3. node:    broadcast from the leader                                               -> every rank the same

Only step 2 crosses the slow link, compressed, and with W/L participants instead of W. Replicas stay bit-identical
(step 3). The compressor's state (error feedback, warm starts) lives on the leaders; the other ranks' copies stay at
their initial state and are checkpointed like any rank's.

Node membership comes from the launcher: LOCAL_RANK and LOCAL_WORLD_SIZE, which launch/rendezvous.py sets from
torchrun, Slurm (SLURM_LOCALID, the tasks on SLURM_NODEID), Open MPI (OMPI_COMM_WORLD_LOCAL_RANK/SIZE) or Ray Train.
Nodes must be whole and equal, of consecutive ranks (torchrun's and Slurm's block placement, mpirun's default):
rank r with local rank l is on the node of ranks r - l .. r - l + L - 1.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from trainer.compress.transport import CountingTransport, TorchTransport

HIERARCHIES = ("none", "node")


def local_env() -> tuple[int, int]:
    """(local rank, ranks on this node) as the launcher gave them (launch/rendezvous.py exports both)."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def node_layout(local: list[tuple[int, int]]) -> list[list[int]]:
    """Every rank's (local rank, local world size), in rank order -> the nodes' rank lists, or a ValueError saying
    why they are not whole, equal nodes of consecutive ranks."""
    world = len(local)
    sizes = sorted({size for _, size in local})
    if len(sizes) != 1 or world % sizes[0] != 0:
        raise ValueError(f"comm.hierarchy = 'node' needs a world that is a whole number of equal nodes; the launcher "
                         f"gave {world} ranks with ranks-per-node {sizes} (LOCAL_WORLD_SIZE per rank: "
                         f"{[s for _, s in local]})")
    size = sizes[0]
    nodes = [list(range(start, start + size)) for start in range(0, world, size)]
    for node in nodes:
        got = [local[r][0] for r in node]
        if got != list(range(size)):
            raise ValueError(f"comm.hierarchy = 'node': ranks {node[0]}..{node[-1]} should be one node with local "
                             f"ranks 0..{size - 1}, the launcher gave {got}; place ranks node by node "
                             "(torchrun and Slurm's block distribution do; mpirun: --map-by slot)")
    return nodes


class NotLeader:
    """The inter-node transport as a non-leader sees it: its node's index among the nodes, no collectives (the
    compressor it is given is never called on such a rank)."""
    name = "not-leader"

    def __init__(self, node: int, nodes: int):
        self.rank, self.world_size, self.bytes_sent, self.link = node, nodes, 0, None

    def __getattr__(self, name):
        raise AssertionError(f"{name}: only a node's leader exchanges between nodes")


class NodeGroups:
    """The process groups of a two-level exchange (a collective: every rank constructs it, in the same order)."""

    def __init__(self):
        assert dist.is_initialized(), "comm.hierarchy needs torch.distributed"
        world = dist.get_world_size()
        mine = torch.tensor(local_env(), dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        self.nodes = node_layout([tuple(int(v) for v in t) for t in gathered])
        rank = dist.get_rank()
        self.node = next(i for i, node in enumerate(self.nodes) if rank in node)
        self.local_size = len(self.nodes[0])
        self.is_leader = rank == self.nodes[self.node][0]
        node_groups = [dist.new_group(node) for node in self.nodes]          # every rank creates every group
        leaders = dist.new_group([node[0] for node in self.nodes])
        self.local = TorchTransport(node_groups[self.node])
        self.between = (CountingTransport(TorchTransport(leaders)) if self.is_leader
                        else NotLeader(self.node, len(self.nodes)))

    def reduce(self, buf: torch.Tensor, exchange_between) -> torch.Tensor:
        """The mean of `buf` over all ranks, in place: node sum, the leaders' exchange_between(node mean), broadcast."""
        if self.local_size > 1:
            self.local.allreduce_(buf).div_(self.local_size)
        if self.is_leader:
            out = exchange_between(buf)
            if out is not buf:
                buf.copy_(out)
        if self.local_size > 1:
            self.local.broadcast_(buf, src=0)
        return buf

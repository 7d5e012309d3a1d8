"""FSDP2 (`torch.distributed.fsdp.fully_shard`) — being built (issue 10, section 2)."""

from __future__ import annotations

from trainer.parallel.engine import Engine


class FSDP2Engine(Engine):
    name = "fsdp2"
    compressors = ("none",)
    sharded = True

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("parallel.engine = 'fsdp2' is being built")

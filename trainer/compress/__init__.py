"""Gradient compressors, selectable by name (`comm.compressor`)."""

from trainer.compress.powersgd import PowerSGDCompressor
from trainer.compress.quant import Int4Compressor, Int8Compressor
from trainer.compress.sign import SignCompressor
from trainer.compress.simple import AllReduceCompressor, BF16Compressor, FP16Compressor, SkipCompressor
from trainer.compress.sparse import RandKCompressor, TopKCompressor

COMPRESSORS = {
    "none": AllReduceCompressor,
    "fp16": FP16Compressor,
    "bf16": BF16Compressor,
    "skip": SkipCompressor,
    "powersgd": PowerSGDCompressor,
    "topk": TopKCompressor,
    "randk": RandKCompressor,
    "int8": Int8Compressor,
    "int4": Int4Compressor,
    "sign": SignCompressor,
    "auto": None,   # measured and resolved to one of the above at start-up (trainer/compress/auto.py)
    # torch's own DDP hooks, the baselines users have today (registered by trainer/parallel/ddp.py):
    "torch_fp16": None,
    "torch_powersgd": None,
}

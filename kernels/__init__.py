"""Encode/decode primitives for compressed gradient payloads (torch only, CPU and CUDA alike)."""

from kernels.bitpack import pack_bits, pack_signs, unpack_bits, unpack_signs
from kernels.quant import dequantize_blockwise, pack_int4, quantize_blockwise, unpack_int4
from kernels.sparse import randk_select, scatter_dense, topk_select

__all__ = [
    "pack_bits", "unpack_bits", "pack_signs", "unpack_signs",
    "quantize_blockwise", "dequantize_blockwise", "pack_int4", "unpack_int4",
    "topk_select", "randk_select", "scatter_dense",
]

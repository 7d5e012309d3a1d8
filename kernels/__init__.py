"""Encode/decode primitives for compressed gradient payloads (torch only, CPU and CUDA alike).

Each codec has a torch reference and, beside it, a compiled fast path with the same bytes; which one runs is
chosen by FIELDTRAIN_KERNELS = reference | compiled | auto (see `kernels.fused`).
"""

from kernels.bitpack import encode_signs, pack_bits, pack_signs, sign_residual, unpack_bits, unpack_signs
from kernels.fused import KernelMismatchError, kernel_mode, set_mode
from kernels.lowrank import lowrank_product
from kernels.quant import (decode_blockwise, dequantize_blockwise, encode_blockwise, encode_with_residual, pack_int4,
                           quantize_blockwise, unpack_int4)
from kernels.rng import hash32, random_key, uniform
from kernels.sparse import randk_select, scatter_dense, topk_select

__all__ = [
    "pack_bits", "unpack_bits", "pack_signs", "unpack_signs", "encode_signs", "sign_residual",
    "quantize_blockwise", "dequantize_blockwise", "encode_blockwise", "decode_blockwise", "encode_with_residual",
    "pack_int4", "unpack_int4",
    "topk_select", "randk_select", "scatter_dense", "lowrank_product",
    "hash32", "random_key", "uniform", "kernel_mode", "set_mode", "KernelMismatchError",
]

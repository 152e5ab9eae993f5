"""Device helpers shared by the Triton kernels: the dropout hash, NF4 decoding, dot.

All of them are ``@triton.jit`` functions inlined into the kernels that call them.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# The interpreter (triton <= 3.8) converts fp32 -> bf16 by truncation where compiled
# code rounds to nearest even; :func:`cast` rounds in software there so interpreted
# results match compiled ones (and torch) bit for bit.
SOFTWARE_BF16_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even for fp32 -> bf16 in the interpreter too."""
    if SOFTWARE_BF16_ROUNDING and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def mix32(x):
    """The lowbias32 finaliser on uint32 (products wrap mod 2**32), as in ``reference/dropout.py``."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def dropout_key(seed_ptr):
    """key = mix32(low 32 bits of the int64 seed), computed on the device: no host sync for the seed."""
    seed = tl.load(seed_ptr).to(tl.uint32)  # int64 -> uint32 truncates: the low 32 bits
    return mix32(seed)


@triton.jit
def dropout_keep(key, rows, cols, row_len, threshold):
    """Keep-mask of the elements (rows, cols) of a row-major [*, row_len] LoRA input.

    ``i = row * row_len + col`` is taken mod 2**32 (computed in int64, then
    truncated) and an element is kept when ``mix32(i ^ key) >= threshold``;
    the comparison runs in int64 so a threshold >= 2**31 keeps its value.
    """
    i = (rows.to(tl.int64) * row_len + cols).to(tl.uint32)
    return mix32(i ^ key).to(tl.int64) >= threshold


@triton.jit
def nf4_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of blocks ``block`` (int64), the double quant decoded in place:
    ``nested_code[absmax[b]] * nested_absmax[b // 256] + offset``. Masked-off blocks give 0."""
    if DOUBLE_QUANT:
        qabsmax = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        absmax = tl.load(nested_code_ptr + qabsmax) * scale + offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def nf4_decode(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, idx, mask,
               BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 value of the NF4 weights at flat (row-major) indices ``idx`` (int64, any shape).

    The general path: any shape, absmax blocks may straddle rows. Masked-off
    elements decode to 0. The code-table gathers hit L1 (16 and 256 floats).
    """
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    shift = ((idx & 1) ^ 1).to(tl.int32) * 4  # the first value (even index) sits in the high nibble
    value = tl.load(code_ptr + ((byte >> shift) & 0xF))
    return value * nf4_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, idx // BLOCKSIZE, mask, DOUBLE_QUANT)


@triton.jit
def nf4_rows(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, rows, row_mask, k0, K,
             BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 tile ``W[rows, k0:k0+BLOCK_K]`` ([len(rows), BLOCK_K]) of an NF4 weight with K % BLOCKSIZE == 0.

    Rows then start on a byte and on an absmax block, so the tile is read as
    BLOCK_K / 2 unique bytes per row (high and low nibbles interleaved back) and
    one absmax per BLOCKSIZE columns, instead of one gather per weight as in
    :func:`nf4_decode` (which costs 2x the loads and, pipelined, 4x the shared memory).
    """
    half = tl.arange(0, BLOCK_K // 2)
    mask = row_mask[:, None] & ((k0 + 2 * half) < K)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * (K // 2) + (k0 // 2 + half)[None, :], mask=mask, other=0).to(tl.int32)
    values = tl.interleave(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 0xF)))
    blocks_per_row = K // BLOCKSIZE
    if BLOCK_K >= BLOCKSIZE:
        nb = tl.arange(0, BLOCK_K // BLOCKSIZE) + k0 // BLOCKSIZE
        bmask = row_mask[:, None] & (nb < blocks_per_row)[None, :]
        absmax = nf4_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                            rows[:, None] * blocks_per_row + nb[None, :], bmask, DOUBLE_QUANT)
        values = tl.reshape(values, (values.shape[0], BLOCK_K // BLOCKSIZE, BLOCKSIZE)) * absmax[:, :, None]
        values = tl.reshape(values, (values.shape[0], BLOCK_K))
    else:
        # The whole tile lies in one block per row (BLOCK_K divides BLOCKSIZE).
        absmax = nf4_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                            rows * blocks_per_row + k0 // BLOCKSIZE, row_mask & (k0 < K), DOUBLE_QUANT)
        values = values * absmax[:, None]
    return values


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. ``UPCAST`` runs the product in fp32: the interpreter (triton <= 3.8)
    multiplies the raw bit patterns of bfloat16 dot operands, so bf16 is upcast there."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)

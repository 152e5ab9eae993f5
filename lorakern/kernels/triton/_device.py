"""Device helpers shared by the Triton kernels: the dropout hash, NF4 decoding, dot.

All of them are ``@triton.jit`` functions inlined into the kernels that call them.
"""

# Annotations stay evaluated (no ``from __future__ import annotations``): triton 3.0's interpreter
# finds constexpr parameters only by a real ``tl.constexpr`` annotation, not the string.
import os
import struct

import triton
import triton.language as tl

from ...formats.nf4 import NF4_CODE_VALUES

# The interpreter (triton <= 3.8) converts fp32 -> bf16 by truncation where compiled
# code rounds to nearest even; :func:`cast` rounds in software there so interpreted
# results match compiled ones (and torch) bit for bit.
SOFTWARE_BF16_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
# The interpreter cannot run inline PTX: it decodes NF4 codes with a table gather instead.
REGISTER_LOOKUP = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


def _nf4_shfl_ptx() -> str:
    """PTX decoding 4 packed NF4 bytes (``$8``, byte i = bits 8i..8i+7) into the fp32 values of
    their high nibbles (``$0..$3``) and low nibbles (``$4..$7``) with one warp shuffle each."""
    bits = [struct.unpack("<I", struct.pack("<f", v))[0] for v in NF4_CODE_VALUES]

    def plane(k: int, first: int) -> str:  # byte k of codes first..first+3, code `first` in byte 0
        return hex(sum(((bits[first + i] >> (8 * k)) & 0xFF) << (8 * i) for i in range(4)))

    lines = [
        "{",
        ".reg .b32 l, h, lo, hi, p0, p1, p2, p3, t, n;",
        # Lane l holds code[l % 16]: byte plane k (byte k of the 16 fp32 codes) is two 8-byte
        # halves looked up by prmt with l % 8, the half chosen by bit 3 of l.
        "mov.u32 l, %laneid;",
        "and.b32 t, l, 7;",
        "shr.b32 h, l, 1;",
        "and.b32 h, h, 4;",
    ]
    for k in range(4):
        lines += [f"prmt.b32 lo, {plane(k, 0)}, {plane(k, 4)}, t;",
                  f"prmt.b32 hi, {plane(k, 8)}, {plane(k, 12)}, t;",
                  f"prmt.b32 p{k}, lo, hi, h;"]
    lines += ["prmt.b32 lo, p0, p1, 0x40;", "prmt.b32 hi, p2, p3, 0x40;", "prmt.b32 t, lo, hi, 0x5410;"]
    # Weight j of the word is nibble j; shfl reads lane b[4:0] and lanes l and l + 16 hold the
    # same code, so the bit above a nibble needs no masking.
    for j in range(8):
        out = (4 + j // 2) if j % 2 == 0 else j // 2  # even nibble: the low one, an odd weight
        src = "$8" if j == 0 else "n"
        if j:
            lines.append(f"shr.b32 n, $8, {4 * j};")
        lines.append(f"shfl.sync.idx.b32 ${out}, t, {src}, 0x1f, 0xffffffff;")
    return "\n".join(lines + ["}"])


NF4_LOOKUP_PTX = tl.constexpr(_nf4_shfl_ptx())


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
def nf4_absmax_decode(stored, nested_absmax_ptr, nested_code_ptr, offset, block, mask, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of blocks ``block`` (int64) from their ``stored`` entries (uint8 codes with
    double quant, else fp32): ``nested_code[stored] * nested_absmax[block // 256] + offset``.

    Masked-off blocks (stored entry 0) give 0 without double quant and ``offset`` with it: the
    GEMMs multiply such weights by operands loaded as 0, and a select here to make them 0 cost
    the sm_90 NF4 GEMM 5 registers (128 -> 133, one program per SM instead of two)."""
    if DOUBLE_QUANT:
        scale = tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + stored.to(tl.int32)) * scale + offset
    else:
        return stored


@triton.jit
def nf4_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of blocks ``block`` (int64), the double quant decoded in place (masking: see
    :func:`nf4_absmax_decode`)."""
    stored = tl.load(absmax_ptr + block, mask=mask, other=0)
    return nf4_absmax_decode(stored, nested_absmax_ptr, nested_code_ptr, offset, block, mask, DOUBLE_QUANT)


@triton.jit
def nf4_codes(byte, code_ptr):
    """fp32 code values ``(high nibble, low nibble)`` of packed NF4 bytes ``byte`` (uint8, any shape).

    Compiled: a register lookup (:data:`NF4_LOOKUP_PTX`). Interpreted: a gather from the
    16-entry table at ``code_ptr`` (the same values; the PTX is checked against it on the CPU).
    """
    if REGISTER_LOOKUP:
        hi, lo = tl.inline_asm_elementwise(NF4_LOOKUP_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [byte],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    else:
        b = byte.to(tl.int32)
        hi = tl.load(code_ptr + (b >> 4))
        lo = tl.load(code_ptr + (b & 0xF))
    return hi, lo


@triton.jit
def nf4_decode(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, idx, mask,
               BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 value of the NF4 weights at flat (row-major) indices ``idx`` (int64, any shape).

    The general path: any shape, absmax blocks may straddle rows. Masked-off
    elements decode to 0 (``-offset`` with double quant, see :func:`nf4_absmax_decode`;
    callers multiply them by zeros). Both nibbles of the byte are looked up and the one
    ``idx`` names is kept (two shuffles beat one gather from global memory).
    """
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0)
    hi, lo = nf4_codes(byte, code_ptr)
    value = tl.where((idx & 1) == 0, hi, lo)  # the first value (even index) sits in the high nibble
    return value * nf4_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, idx // BLOCKSIZE, mask, DOUBLE_QUANT)


@triton.jit
def nf4_tile_blocks(rows, row_mask, k0, K, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """(absmax block indices, mask) of the tile ``W[rows, k0:k0+BLOCK_K]`` (K % BLOCKSIZE == 0):
    ``[len(rows), BLOCK_K // BLOCKSIZE]``, or ``[len(rows)]`` when the tile lies in one block per row."""
    blocks_per_row = K // BLOCKSIZE
    if BLOCK_K >= BLOCKSIZE:
        nb = tl.arange(0, BLOCK_K // BLOCKSIZE) + k0 // BLOCKSIZE
        return rows[:, None] * blocks_per_row + nb[None, :], row_mask[:, None] & (nb < blocks_per_row)[None, :]
    else:
        return rows * blocks_per_row + k0 // BLOCKSIZE, row_mask & (k0 < K)


@triton.jit
def nf4_tile_absmax(absmax_ptr, rows, row_mask, k0, K, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """The stored absmax entries of the tile ``W[rows, k0:k0+BLOCK_K]`` (see :func:`nf4_tile`).

    GEMM main loops load them one tile ahead: with double quant they index the gather
    ``nested_code[absmax]``, and loaded in the same iteration (one byte each, which cannot
    go through cp.async) the loop stalled on a global load every iteration before it.
    """
    block, mask = nf4_tile_blocks(rows, row_mask, k0, K, BLOCK_K, BLOCKSIZE)
    return tl.load(absmax_ptr + block, mask=mask, other=0)


@triton.jit
def nf4_tile(packed_ptr, stored_absmax, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, rows, row_mask, k0, K,
             BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 tile ``W[rows, k0:k0+BLOCK_K]`` ([len(rows), BLOCK_K]) of an NF4 weight with K % BLOCKSIZE == 0,
    given the tile's stored absmax entries (:func:`nf4_tile_absmax`).

    Rows then start on a byte and on an absmax block, so the tile is read as
    BLOCK_K / 2 unique bytes per row (high and low nibbles interleaved back) and
    one absmax per BLOCKSIZE columns, instead of one gather per weight as in
    :func:`nf4_decode` (which costs 2x the loads and, pipelined, 4x the shared memory).
    """
    # Rows and tiles start on a multiple of BLOCKSIZE / 2 >= 16 bytes. Index and mask are
    # written over bytes so that triton sees it: the bytes then load as 16-byte vectors (with
    # the mask over ``k0 + 2 * half`` it loaded them one byte per instruction).
    row_bytes = tl.multiple_of(K // 2, BLOCKSIZE // 2)
    bytes_ = tl.multiple_of(k0 // 2, BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    mask = row_mask[:, None] & (bytes_ < row_bytes)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * row_bytes + bytes_[None, :], mask=mask, other=0)
    hi, lo = nf4_codes(byte, code_ptr)
    values = tl.interleave(hi, lo)
    block, bmask = nf4_tile_blocks(rows, row_mask, k0, K, BLOCK_K, BLOCKSIZE)
    absmax = nf4_absmax_decode(stored_absmax, nested_absmax_ptr, nested_code_ptr, offset, block, bmask, DOUBLE_QUANT)
    if BLOCK_K >= BLOCKSIZE:
        values = tl.reshape(values, (values.shape[0], BLOCK_K // BLOCKSIZE, BLOCKSIZE)) * absmax[:, :, None]
        return tl.reshape(values, (values.shape[0], BLOCK_K))
    else:
        return values * absmax[:, None]


@triton.jit
def nf4_rows(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, rows, row_mask, k0, K,
             BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """:func:`nf4_tile` with the absmax entries loaded in place."""
    stored = nf4_tile_absmax(absmax_ptr, rows, row_mask, k0, K, BLOCK_K, BLOCKSIZE)
    return nf4_tile(packed_ptr, stored, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, rows, row_mask, k0, K,
                    BLOCK_K, BLOCKSIZE, DOUBLE_QUANT)


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. ``UPCAST`` runs the product in fp32: the interpreter (triton <= 3.8)
    multiplies the raw bit patterns of bfloat16 dot operands, so bf16 is upcast there."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)

"""LoRA dropout without a stored mask: a counter-based hash of (seed, element index).

Every backend computes the same mask bit for bit, so the forward pass can
generate it on the fly and the backward pass regenerate it; no mask tensor is
ever saved. For element ``i`` of the row-major ``[M, K]`` LoRA input (``i``
taken modulo 2**32) and a seed ``s`` (its low 32 bits)::

    key  = mix32(s)
    h    = mix32(i ^ key)
    keep = h >= threshold(p)          threshold(p) = min(floor(p * 2**32), 2**32 - 1)
    drop(x)[i] = x[i] * keep / (1 - p)

``mix32`` is a 32-bit integer finaliser (xor-shift / multiply, the "lowbias32"
constants), a bijection on uint32 with good avalanche, cheap in any language:

    x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16   (mod 2**32)
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The finaliser on an int64 tensor holding uint32 values (products wrap mod 2**64; low 32 bits kept)."""
    x = x ^ (x >> 16)
    x = (x * MIX_MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MUL2) & MASK32
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which an element is dropped."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return min(int(p * 4294967296.0), MASK32)


def dropout_mask(seed: torch.Tensor, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask ``[rows, cols]`` for seed tensor ``seed`` (int64, one element)."""
    device = seed.device if device is None else device
    key = mix32(seed.reshape(-1)[:1].to(device=device, dtype=torch.int64) & MASK32)
    idx = torch.arange(rows * cols, device=device, dtype=torch.int64) & MASK32
    h = mix32(idx ^ key)
    return (h >= dropout_threshold(p)).reshape(rows, cols)


def apply_dropout(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``drop(x)`` for a 2-D ``x``: kept elements scaled by ``1 / (1 - p)``; identity when ``p == 0``."""
    if p == 0.0:
        return x
    keep = dropout_mask(seed, x.shape[0], x.shape[1], p, x.device)
    # where, not x * keep: a dropped NaN / inf / negative gives +0, as every kernel does
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))

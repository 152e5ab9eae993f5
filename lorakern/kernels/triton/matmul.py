"""Fused LoRA / QLoRA GEMMs: forward, input gradient, and the small gradient GEMMs.

Forward, one GEMM whose reduction runs over the K base columns and then the r
LoRA columns (``xa = drop(x) A^T`` computed first by :func:`skinny_matmul`)::

    y = [x | xa] @ [W | s*B]^T + bias                                  (_lora_fwd_kernel)

Input gradient, one GEMM over the r columns of g = dy B and then the N columns of dy::

    dx = drop'(s * g @ A) + dy @ W                                     (_lora_dx_kernel)

With dropout the LoRA part must be masked on its own, so the kernel reduces it
first and applies the regenerated mask before the main loop accumulates onto it.
W is either a dense [N, K] tensor or an NF4 weight whose tiles are decoded in
registers inside the main loop (the dequantized weight never exists in memory).

Weight gradients reduce over M: ``C = scale * P^T @ drop(Q)`` (_tn_kernel), split
over M into fp32 partial sums when the output alone gives too few programs.
"""

# Annotations stay evaluated (no ``from __future__ import annotations``): triton 3.0's interpreter
# finds constexpr parameters only by a real ``tl.constexpr`` annotation, not the string.
import torch
import triton
import triton.language as tl

from ...formats.nf4 import NF4Weight
from ...reference.dropout import dropout_threshold
from ._device import cast, dot, dropout_keep, dropout_key, nf4_decode, nf4_tile, nf4_tile_absmax
from ._launch import (Tuned, device_guard, dot_precision, gemm_configs, gemm_configs_unpipelined, m_bucket,
                      nf4_gemm_configs, nf4_operands, rank_block, skinny_configs, sm_count, tn_configs, upcast_dot)


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in groups of GROUP_M row tiles, so neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


# M varies from call to call in training (sequence lengths); specializing on it (M == 1,
# M % 16 == 0) would compile new variants mid-run for no gain in the inner loop.
_VARYING = ["M", "M_KEY", "R"]


@triton.jit(do_not_specialize=_VARYING)
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr,
    absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset_ptr,
    M, N, K, R, M_KEY, scaling,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_xam, stride_xar, stride_bn, stride_br, stride_ym, stride_yn,
    W_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, NF4_ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    dtype = y_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_NF4:
        offset = tl.load(offset_ptr)
        if NF4_ALIGNED:
            stored_absmax = nf4_tile_absmax(absmax_ptr, cols, mask_n, 0, K, BLOCK_K, NF4_BLOCKSIZE)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < K
        a = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_k[:, None] & mask_n[None, :]
        if W_NF4:
            if NF4_ALIGNED:
                w = tl.trans(nf4_tile(w_ptr, stored_absmax, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, cols,
                                      mask_n, k0, K, BLOCK_K, NF4_BLOCKSIZE, DOUBLE_QUANT))
                stored_absmax = nf4_tile_absmax(absmax_ptr, cols, mask_n, k0 + BLOCK_K, K, BLOCK_K, NF4_BLOCKSIZE)
            else:
                w = nf4_decode(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset,
                               cols[None, :] * K + kk[:, None], w_mask, NF4_BLOCKSIZE, DOUBLE_QUANT)
            w = cast(w, dtype)
        else:
            w = tl.load(w_ptr + cols[None, :] * stride_wn + kk[:, None] * stride_wk, mask=w_mask, other=0.0)
        acc = dot(a, w, acc, UPCAST_DOT, DOT_PRECISION)
    if HAS_LORA:
        # The r LoRA columns of the same reduction: xa @ [s * B]^T. The scaling goes on the
        # weight side: s * B is O(1e-2) for real adapters, while s * xa, rounded to fp16 before
        # the dot, overflowed (s = 64, xa = 2000: 128000 > 65504, an inf output where the
        # term is 51.2). Scaling the fp32 product instead would need a second accumulator.
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < R
            xa = tl.load(xa_ptr + rows[:, None] * stride_xam + rr[None, :] * stride_xar,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            bt = tl.load(b_ptr + cols[None, :] * stride_bn + rr[:, None] * stride_br,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            bt = cast(bt.to(tl.float32) * scaling, dtype)
            acc = dot(xa, bt, acc, UPCAST_DOT, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, cast(acc, dtype),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=_VARYING)
def _lora_dx_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, dx_ptr, seed_ptr,
    absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset_ptr,
    M, N, K, R, M_KEY, scaling, threshold, keep_scale,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    W_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, NF4_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Output tile dx[BLOCK_M, BLOCK_N] over columns of K; the reduction (BLOCK_K wide) runs over N.
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    rows = offs_m.to(tl.int64)
    cols = offs_k.to(tl.int64)
    dtype = dx_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        # The LoRA term goes first: with dropout it is masked on its own, and done before the
        # main loop it needs no second accumulator there (two 128x128 fp32 tiles took all 255
        # registers of a 4-warp program and spilled 472 bytes, in the main loop too).
        # Without dropout the scaling goes on the weight side, g @ [s * A], as in the forward:
        # s * g rounded to fp16 overflowed (s = 64, g = 3200: 204800 > 65504) where s * A is
        # O(1e-2); with dropout it multiplies the fp32 sum below.
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < R
            g = tl.load(g_ptr + rows[:, None] * stride_gm + rr[None, :] * stride_gr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            a = tl.load(a_ptr + rr[:, None] * stride_ar + cols[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            if not HAS_DROPOUT:
                a = cast(a.to(tl.float32) * scaling, dtype)
            acc = dot(g, a, acc, UPCAST_DOT, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(dropout_key(seed_ptr), rows[:, None], cols[None, :], K, threshold)
            acc = tl.where(keep, acc * (scaling * keep_scale), 0.0)
    if W_NF4:
        offset = tl.load(offset_ptr)
        if NF4_ALIGNED:
            first = tl.arange(0, BLOCK_K)
            stored_absmax = nf4_tile_absmax(absmax_ptr, first.to(tl.int64), first < N, pid_k * BLOCK_N, K, BLOCK_N,
                                            NF4_BLOCKSIZE)
    for n0 in range(0, N, BLOCK_K):
        nn = n0 + tl.arange(0, BLOCK_K)
        mask_n = nn < N
        g = tl.load(dy_ptr + rows[:, None] * stride_dym + nn[None, :] * stride_dyn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w_mask = mask_n[:, None] & mask_k[None, :]
        if W_NF4:
            if NF4_ALIGNED:
                w = nf4_tile(w_ptr, stored_absmax, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, nn.to(tl.int64),
                             mask_n, pid_k * BLOCK_N, K, BLOCK_N, NF4_BLOCKSIZE, DOUBLE_QUANT)
                ahead = nn + BLOCK_K
                stored_absmax = nf4_tile_absmax(absmax_ptr, ahead.to(tl.int64), ahead < N, pid_k * BLOCK_N, K, BLOCK_N,
                                                NF4_BLOCKSIZE)
            else:
                w = nf4_decode(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset,
                               nn.to(tl.int64)[:, None] * K + cols[None, :], w_mask, NF4_BLOCKSIZE, DOUBLE_QUANT)
            w = cast(w, dtype)
        else:
            w = tl.load(w_ptr + nn.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wk, mask=w_mask, other=0.0)
        acc = dot(g, w, acc, UPCAST_DOT, DOT_PRECISION)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk, cast(acc, dtype),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=["M", "M_KEY"])
def _skinny_kernel(
    x_ptr, w_ptr, out_ptr, seed_ptr,
    M, K, R, M_KEY, threshold, keep_scale,
    stride_xm, stride_xk, stride_wk, stride_wr, stride_om, stride_or,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[M, R] = drop(x)[M, K] @ w[K, R] with R the LoRA rank; memory-bound on x.
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rows = offs_m.to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    if HAS_DROPOUT:
        key = dropout_key(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(key, rows[:, None], kk[None, :], K, threshold)
            x = cast(tl.where(keep, x.to(tl.float32) * keep_scale, 0.0), dtype)
        w = tl.load(w_ptr + kk.to(tl.int64)[:, None] * stride_wk + offs_r[None, :] * stride_wr,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = dot(x, w, acc, UPCAST_DOT, DOT_PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or, cast(acc, dtype),
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["M", "M_KEY", "rows_per_split"])
def _tn_kernel(
    p_ptr, q_ptr, c_ptr, seed_ptr,
    M, J, L, M_KEY, rows_per_split, scaling, threshold, keep_scale,
    stride_pm, stride_pj, stride_qm, stride_ql, stride_cs, stride_cj, stride_cl,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # c[split, J, L] = scaling * P[rows, J]^T @ drop(Q[rows, L]) over this split's rows;
    # the dropout index of Q is row * L + col (Q is the [M, K] LoRA input when dropped).
    pid_j = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_j = offs_j < J
    mask_l = offs_l < L
    dtype = q_ptr.dtype.element_ty
    if HAS_DROPOUT:
        key = dropout_key(seed_ptr)
    acc = tl.zeros((BLOCK_J, BLOCK_L), dtype=tl.float32)
    start = pid_s * rows_per_split
    stop = min(start + rows_per_split, M)
    for m0 in range(start, stop, BLOCK_M):
        mm = m0 + tl.arange(0, BLOCK_M)
        mask_mm = mm < stop
        rows = mm.to(tl.int64)
        pt = tl.load(p_ptr + rows[None, :] * stride_pm + offs_j[:, None] * stride_pj,
                     mask=mask_j[:, None] & mask_mm[None, :], other=0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_qm + offs_l[None, :] * stride_ql,
                    mask=mask_mm[:, None] & mask_l[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(key, rows[:, None], offs_l[None, :], L, threshold)
            q = cast(tl.where(keep, q.to(tl.float32) * keep_scale, 0.0), dtype)
        acc = dot(pt, q, acc, UPCAST_DOT, DOT_PRECISION)
    acc = acc * scaling
    tl.store(c_ptr + pid_s.to(tl.int64) * stride_cs + offs_j.to(tl.int64)[:, None] * stride_cj + offs_l[None, :] * stride_cl,
             cast(acc, c_ptr.dtype.element_ty), mask=mask_j[:, None] & mask_l[None, :])


_GEMM_KEY = ["M_KEY", "N", "K", "W_NF4", "HAS_LORA"]
_lora_fwd = Tuned(_lora_fwd_kernel, gemm_configs, key=_GEMM_KEY)
_lora_dx = Tuned(_lora_dx_kernel, gemm_configs, key=_GEMM_KEY)
_lora_fwd_nf4 = Tuned(_lora_fwd_kernel, nf4_gemm_configs, key=_GEMM_KEY)
_lora_dx_nf4 = Tuned(_lora_dx_kernel, nf4_gemm_configs, key=_GEMM_KEY)
_lora_fwd_unaligned = Tuned(_lora_fwd_kernel, gemm_configs_unpipelined, key=_GEMM_KEY)
_lora_dx_unaligned = Tuned(_lora_dx_kernel, gemm_configs_unpipelined, key=_GEMM_KEY)
_skinny = Tuned(_skinny_kernel, skinny_configs, key=["M_KEY", "K", "R"])
_tn = Tuned(_tn_kernel, tn_configs, key=["M_KEY", "J", "L"])


# ------------------------------------------------------------------------------------ launchers


def dropout_args(dropout_p: float) -> tuple[int, float]:
    """(uint32 threshold, keep scale) of ``reference/dropout.py`` for probability ``dropout_p``."""
    return dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _nf4_args(q: NF4Weight | None, like: torch.Tensor):
    if q is None:
        return (like, like, like, like, like), dict(W_NF4=False, DOUBLE_QUANT=False, NF4_BLOCKSIZE=64, NF4_ALIGNED=False)
    tensors = nf4_operands(q)
    aligned = q.shape[1] % q.blocksize == 0
    return tensors, dict(W_NF4=True, DOUBLE_QUANT=q.double_quant, NF4_BLOCKSIZE=q.blocksize, NF4_ALIGNED=aligned)


def lora_matmul(x: torch.Tensor, weight: torch.Tensor | None, q: NF4Weight | None, bias: torch.Tensor | None,
                xa: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T + s * xa [M, r] @ lora_B [N, r]^T + bias``, W dense ``[N, K]`` or NF4 ``q``.

    One launch; ``xa``/``lora_B`` None for a plain (NF4) linear.
    """
    m, k = x.shape
    n = q.shape[0] if q is not None else weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bias = bias.contiguous() if bias is not None else None
    w = q.packed if q is not None else weight
    nf4_tensors, nf4_flags = _nf4_args(q, x)
    has_lora = xa is not None
    r = xa.shape[1] if has_lora else 0
    xa_ = xa if has_lora else x
    b_ = lora_B if has_lora else x
    w_strides = (weight.stride(0), weight.stride(1)) if q is None else (k, 1)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    kernel = _lora_fwd if q is None else _lora_fwd_nf4 if nf4_flags["NF4_ALIGNED"] else _lora_fwd_unaligned
    with device_guard(x):
        kernel[grid](
            x, w, bias if bias is not None else x, xa_, b_, y, *nf4_tensors,
            m, n, k, r, m_bucket(m), float(scaling),
            x.stride(0), x.stride(1), *w_strides, xa_.stride(0), xa_.stride(1), b_.stride(0), b_.stride(1),
            y.stride(0), y.stride(1),
            **nf4_flags, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
            UPCAST_DOT=upcast_dot(x.dtype), DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(r),
        )
    return y


def lora_matmul_t(dy: torch.Tensor, weight: torch.Tensor | None, q: NF4Weight | None, g: torch.Tensor | None,
                  lora_A: torch.Tensor | None, scaling: float, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """``dx [M, K] = dy [M, N] @ W + drop'(s * g [M, r] @ lora_A [r, K])`` in one launch."""
    m, n = dy.shape
    k = q.shape[1] if q is not None else weight.shape[1]
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    w = q.packed if q is not None else weight
    nf4_tensors, nf4_flags = _nf4_args(q, dy)
    has_lora = g is not None
    r = g.shape[1] if has_lora else 0
    g_ = g if has_lora else dy
    a_ = lora_A if has_lora else dy
    has_dropout = has_lora and dropout_p > 0.0
    threshold, keep_scale = dropout_args(dropout_p)
    w_strides = (weight.stride(0), weight.stride(1)) if q is None else (k, 1)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)  # noqa: E731
    kernel = _lora_dx if q is None else _lora_dx_nf4 if nf4_flags["NF4_ALIGNED"] else _lora_dx_unaligned
    with device_guard(dy):
        kernel[grid](
            dy, w, g_, a_, dx, seed if has_dropout else dy, *nf4_tensors,
            m, n, k, r, m_bucket(m), float(scaling), threshold, keep_scale,
            dy.stride(0), dy.stride(1), *w_strides, g_.stride(0), g_.stride(1), a_.stride(0), a_.stride(1),
            dx.stride(0), dx.stride(1),
            **nf4_flags, HAS_LORA=has_lora, HAS_DROPOUT=has_dropout,
            UPCAST_DOT=upcast_dot(dy.dtype), DOT_PRECISION=dot_precision(dy.dtype), BLOCK_R=rank_block(r),
        )
    return dx


def skinny_matmul(x: torch.Tensor, w_kr: torch.Tensor, dropout_p: float = 0.0, seed: torch.Tensor | None = None) -> torch.Tensor:
    """``out [M, R] = drop(x [M, K]) @ w_kr [K, R]`` for a small R (the LoRA rank); any strides."""
    m, k = x.shape
    r = w_kr.shape[1]
    out = torch.empty((m, r), dtype=x.dtype, device=x.device)
    has_dropout = dropout_p > 0.0
    threshold, keep_scale = dropout_args(dropout_p)
    block_r = rank_block(r)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r))  # noqa: E731
    with device_guard(x):
        _skinny[grid](
            x, w_kr, out, seed if has_dropout else x,
            m, k, r, m_bucket(m), threshold, keep_scale,
            x.stride(0), x.stride(1), w_kr.stride(0), w_kr.stride(1), out.stride(0), out.stride(1),
            HAS_DROPOUT=has_dropout, UPCAST_DOT=upcast_dot(x.dtype), DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r,
        )
    return out


# Rows of M per split of a gradient GEMM: below ~512 rows a split's fixed cost
# (one output tile write + the final sum) is no longer small against its work.
_MIN_ROWS_PER_SPLIT = 512


def tn_matmul(p: torch.Tensor, q: torch.Tensor, scaling: float = 1.0, dropout_p: float = 0.0,
              seed: torch.Tensor | None = None) -> torch.Tensor:
    """``c [J, L] = scaling * p [M, J]^T @ drop(q [M, L])`` in the dtype of ``q``; reduction over M.

    The gradient GEMMs (dA, dB, dW) have few output tiles when J or L is the LoRA
    rank (dA of a 4096-wide layer is 1 x 64 tiles), so the M reduction is split
    until about two programs per SM exist; splits write fp32 partial sums.
    """
    m, j = p.shape
    l_ = q.shape[1]
    tiles = triton.cdiv(j, 64) * triton.cdiv(l_, 64)
    split = max(1, min(2 * sm_count(q) // max(tiles, 1), m // _MIN_ROWS_PER_SPLIT))
    rows_per_split = triton.cdiv(m, split)
    # One split writes the result directly; several write fp32 partials [split, J, L].
    out = torch.empty((split, j, l_) if split > 1 else (j, l_), dtype=torch.float32 if split > 1 else q.dtype,
                      device=q.device)
    stride_split = out.stride(0) if split > 1 else 0
    has_dropout = dropout_p > 0.0
    threshold, keep_scale = dropout_args(dropout_p)
    grid = lambda meta: (triton.cdiv(j, meta["BLOCK_J"]), triton.cdiv(l_, meta["BLOCK_L"]), split)  # noqa: E731
    with device_guard(q):
        _tn[grid](
            p, q, out, seed if has_dropout else q,
            m, j, l_, m_bucket(m), rows_per_split, float(scaling), threshold, keep_scale,
            p.stride(0), p.stride(1), q.stride(0), q.stride(1), stride_split, out.stride(-2), out.stride(-1),
            HAS_DROPOUT=has_dropout, UPCAST_DOT=upcast_dot(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        )
    return out if split == 1 else out.sum(0).to(q.dtype)

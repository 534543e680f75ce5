"""Prefill attention: causal, FlashAttention-2 style, grouped-query, ragged rows, cached offsets; with backward.

One forward kernel serves both uses the model has:
- packed training rows (no cache): q [B,H,S,D], k/v [B,KV,S,D]; token i attends to j in [seg_start[i], i];
- a prefill chunk over the slot cache: row b's queries sit at q_start[b] .. q_start[b]+q_len[b]-1 and attend to
  cache[kv_index[b], :, 0:pos+1] in place (no gather, no copy).
One program owns a BLOCK_M tile of queries of one head; K/V tiles stream through it with the online softmax in
base 2 (exp2 with log2(e) folded into the scale). The key loop is split in three ranges so that only the tiles
a mask can cut pay for it: [lo, full_lo) masked (segment starts), [full_lo, full_hi) unmasked,
[full_hi, hi) masked (the diagonal).

Backward (FlashAttention-2): delta = rowsum(dO * O) in torch, one kernel for dK/dV (a program per key tile and
KV head, looping over the query heads of its group, so no atomics) and one for dQ (a program per query tile).

Written with pointer arithmetic only (no `tl.make_block_ptr`, removed in triton 3.9) so triton 3.6 and 3.9
both compile it. Under TRITON_INTERPRET=1 fixed block sizes are used; on a GPU the forward is autotuned.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels import SUPPORTED_HEAD_DIMS, check_runnable, interpreting
from kernels.reference import segment_bounds

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_tile(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    q_pos,
    row_lo,
    kv_len,
    start,
    end,
    qk_scale,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Accumulate keys [start, end) into (acc, l_i, m_i); MASKED applies causal, segment and length masks."""
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_ok = offs_n < kv_len
            k = tl.load(
                k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                mask=kv_ok[None, :],
                other=0.0,
            )
            v = tl.load(
                v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_ok[:, None],
                other=0.0,
            )
        else:
            k = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd)
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, k) * qk_scale
        if MASKED:
            ok = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] >= row_lo[:, None])
            ok = ok & (offs_n[None, :] < kv_len)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with every key masked so far keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    kv_index_ptr,
    q_start_ptr,
    q_len_ptr,
    seg_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    stride_segb,
    num_heads,
    seq_q,
    qk_scale,
    TUNE_KEY,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kvh = h // GROUP
    slot = tl.load(kv_index_ptr + b).to(tl.int64)
    q_start = tl.load(q_start_ptr + b)
    q_len = tl.load(q_len_ptr + b)
    kv_len = q_start + q_len

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q_pos = q_start + offs_m
    if HAS_SEG:
        row_lo = tl.load(seg_ptr + b * stride_segb + offs_m, mask=row_ok, other=0)
    else:
        row_lo = tl.zeros([BLOCK_M], dtype=tl.int32)

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0
    )
    k_base = K + slot * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + slot * stride_vb + kvh.to(tl.int64) * stride_vh

    # Key range of this tile: [lo, hi). A tile with no valid query row gets an empty range.
    has_rows = pid_m * BLOCK_M < q_len
    hi = tl.where(has_rows, tl.minimum(q_start + (pid_m + 1) * BLOCK_M, kv_len), 0)
    lo = tl.min(tl.where(row_ok, row_lo, kv_len), 0)
    lo = tl.minimum((lo // BLOCK_N) * BLOCK_N, hi)
    # Unmasked middle: keys every valid row may see (>= the latest segment start, < the first query position).
    max_lo = tl.max(tl.where(row_ok, row_lo, 0), 0)
    full_lo = tl.minimum(tl.maximum(((max_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo), hi)
    full_hi = tl.minimum(tl.maximum(((q_start + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N, full_lo), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_tile(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, q_pos, row_lo, kv_len,
        lo, full_lo, qk_scale, True, BLOCK_N, HEAD_DIM, IEEE,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tile(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, q_pos, row_lo, kv_len,
        full_lo, full_hi, qk_scale, False, BLOCK_N, HEAD_DIM, IEEE,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tile(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, q_pos, row_lo, kv_len,
        full_hi, hi, qk_scale, True, BLOCK_N, HEAD_DIM, IEEE,
    )  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    out = tl.where(row_ok[:, None], out, 0.0)
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    in_bounds = offs_m < seq_q
    tl.store(
        o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=in_bounds[:, None],
    )
    # Base-2 log-sum-exp of the scaled scores, for the backward pass (0 for rows that saw no key).
    lse = tl.where(l_i == 0.0, 0.0, m_i + tl.math.log2(l_safe))
    tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=in_bounds)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    seg_start_ptr,
    seg_end_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_segb,
    num_kv_heads,
    seq,
    qk_scale,
    sm_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV for one key tile of one KV head. Q, dO and O share strides (contiguous [B,H,S,D]); K/V/DK/DV too."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // num_kv_heads
    kvh = pid_bk % num_kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < seq
    kv_off = b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    k = tl.load(K + kv_off + offs_n[:, None] * stride_ks + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + kv_off + offs_n[:, None] * stride_ks + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    # Queries that can see this tile: from the tile's first key to the end of the last key's example.
    m_lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    seg_end = tl.load(seg_end_ptr + b * stride_segb + offs_n, mask=n_ok, other=0)
    m_hi = tl.max(seg_end, 0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        row_off = (b * num_kv_heads * GROUP + h).to(tl.int64) * seq
        for m0 in tl.range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < seq
            q = tl.load(
                Q + q_off + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_ok[:, None], other=0.0
            )
            do = tl.load(
                DO + q_off + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_ok[:, None], other=0.0
            )
            lse = tl.load(LSE + row_off + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + row_off + offs_m, mask=m_ok, other=0.0)
            row_lo = tl.load(seg_start_ptr + b * stride_segb + offs_m, mask=m_ok, other=0)
            if IEEE:
                st = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale  # [BLOCK_N, BLOCK_M]
            else:
                st = tl.dot(k, tl.trans(q)) * qk_scale
            ok = (offs_n[:, None] <= offs_m[None, :]) & (offs_n[:, None] >= row_lo[None, :])
            ok = ok & m_ok[None, :] & n_ok[:, None]
            pt = tl.where(ok, tl.math.exp2(st - lse[None, :]), 0.0)
            if IEEE:
                dv = tl.dot(pt.to(do.dtype), do, dv, input_precision="ieee")
                dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
            else:
                dv = tl.dot(pt.to(do.dtype), do, dv)
                dpt = tl.dot(v, tl.trans(do))
            dst = pt * (dpt - delta[None, :])
            if IEEE:
                dk = tl.dot(dst.to(q.dtype), q, dk, input_precision="ieee")
            else:
                dk = tl.dot(dst.to(q.dtype), q, dk)
    dk = dk * sm_scale
    tl.store(
        DK + kv_off + offs_n[:, None] * stride_ks + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=n_ok[:, None],
    )
    tl.store(
        DV + kv_off + offs_n[:, None] * stride_ks + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=n_ok[:, None],
    )


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    seg_start_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_segb,
    num_heads,
    seq,
    qk_scale,
    sm_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < seq
    q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    kv_off = b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    q = tl.load(Q + q_off + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + q_off + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * seq + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * seq + offs_m, mask=m_ok, other=0.0)
    row_lo = tl.load(seg_start_ptr + b * stride_segb + offs_m, mask=m_ok, other=0)
    lo = tl.min(tl.where(m_ok, row_lo, seq), 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum((pid_m + 1) * BLOCK_M, seq)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in tl.range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq
        kt = tl.load(
            K + kv_off + offs_n[None, :] * stride_ks + offs_d[:, None], mask=n_ok[None, :], other=0.0
        )
        vt = tl.load(
            V + kv_off + offs_n[None, :] * stride_ks + offs_d[:, None], mask=n_ok[None, :], other=0.0
        )
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
            dp = tl.dot(do, vt, input_precision="ieee")
        else:
            s = tl.dot(q, kt) * qk_scale
            dp = tl.dot(do, vt)
        ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= row_lo[:, None]) & n_ok[None, :]
        p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision="ieee")
        else:
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)
    dq = dq * sm_scale
    tl.store(
        DQ + q_off + offs_m[:, None] * stride_qs + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=m_ok[:, None],
    )


# --- host side -------------------------------------------------------------------------------------------------

# GPU forward configs: the Triton fused-attention tutorial's Hopper choices (BLOCK_M 128, BLOCK_N 64/128,
# 4 or 8 warps, 3-4 stages) plus 64-row tiles for short or ragged chunks; 8 configs keep the one-off compile
# of a new (head_dim, group, dtype) under a minute.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in (
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 128, 8, 2),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 128, 4, 3),
    )
]
_attn_fwd_tuned = triton.autotune(
    configs=_FWD_CONFIGS, key=["TUNE_KEY", "HEAD_DIM", "GROUP", "HAS_SEG", "IEEE"]
)(_attn_fwd_kernel)

# Interpreter block sizes: every program costs numpy dispatch overhead, so fewer, larger tiles run faster;
# 64 still leaves several tiles (and ragged edges) for the 129- and 300-token test shapes; 64 ran the
# 300-token forward+backward in 1.1 s where 32 took 3.0 s.
INTERPRET_BLOCK = 64
_SUPPORTED_HEAD_DIMS = SUPPORTED_HEAD_DIMS


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_runnable("q", q)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects 4-d q/k/v, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    d = q.shape[-1]
    if d not in _SUPPORTED_HEAD_DIMS or k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"head_dim must be one of {_SUPPORTED_HEAD_DIMS} and equal for q/k/v, got {d}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of KV heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q/k/v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q/k/v need a contiguous last (head) dimension")


def _tiles(block: int | tuple[int, int] | None, default: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) from a forced size (one int for both, or a pair) or the default."""
    if block is None:
        return default, default
    return (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))


def _launch_fwd(q, k, v, kv_index, q_start, q_len, seg_start, sm_scale, block=None):
    b, h, s, d = q.shape
    group = h // k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty((b, h, s), device=q.device, dtype=torch.float32)
    has_seg = seg_start is not None
    seg = seg_start if has_seg else q_len  # any int tensor: never read when HAS_SEG is False
    args = (
        q, k, v, o, lse, kv_index, q_start, q_len, seg,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        seg.stride(0) if has_seg else 0,
        h, s, sm_scale * LOG2E, triton.next_power_of_2(s),
    )  # fmt: skip
    meta = dict(GROUP=group, HEAD_DIM=d, HAS_SEG=has_seg, IEEE=q.dtype == torch.float32)
    if block is not None or interpreting() or q.device.type != "cuda":
        bm, bn = _tiles(block, INTERPRET_BLOCK)
        grid = (triton.cdiv(s, bm), b * h)
        _attn_fwd_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    elif os.environ.get("INSTRUCTLM_TRITON_AUTOTUNE", "1") == "0":
        # One fixed config, no tuning sweep: each new shape then compiles once instead of 8 times (test runs).
        grid = (triton.cdiv(s, 64), b * h)
        _attn_fwd_kernel[grid](*args, **meta, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    else:
        grid = lambda m: (triton.cdiv(s, m["BLOCK_M"]), b * h)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **meta)
    return o, lse


def _launch_bwd(q, k, v, o, lse, do, seg_start, seg_end, sm_scale, block=None):
    b, h, s, d = q.shape
    kv = k.shape[1]
    group = h // kv
    do = do.contiguous()
    # fp64 row sums: dp - delta cancels to 0 where one key dominates, and an fp32 delta there left dK 1e-6 off
    # at one token (seq 1, 4 query heads per KV head); this [B, H, S] pass is O(S·D), the kernels O(S²·D).
    delta = (o.double() * do.double()).sum(-1).float()  # [B, H, S]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    on_gpu = q.device.type == "cuda" and not interpreting()
    # Backward holds q, k, v, dO and two accumulators per program: 64x64 tiles fit shared memory at D=128.
    bm, bn = _tiles(block, 64 if on_gpu else INTERPRET_BLOCK)
    meta = dict(GROUP=group, HEAD_DIM=d, IEEE=q.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn)
    extra = dict(num_warps=4 if d <= 64 else 8, num_stages=2) if on_gpu else {}
    _attn_bwd_dkdv_kernel[(triton.cdiv(s, bn), b * kv)](
        q, k, v, do, lse, delta, dk, dv, seg_start, seg_end,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), seg_start.stride(0),
        kv, s, sm_scale * LOG2E, sm_scale, **meta, **extra,
    )  # fmt: skip
    _attn_bwd_dq_kernel[(triton.cdiv(s, bm), b * h)](
        q, k, v, do, lse, delta, dq, seg_start,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), seg_start.stride(0),
        h, s, sm_scale * LOG2E, sm_scale, **meta, **extra,
    )  # fmt: skip
    return dq, dk, dv


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg_start, seg_end, sm_scale, block):
        b = q.shape[0]
        s = q.shape[2]
        rows = torch.arange(b, device=q.device, dtype=torch.int32)
        q_start = torch.zeros(b, device=q.device, dtype=torch.int32)
        q_len = torch.full((b,), s, device=q.device, dtype=torch.int32)
        o, lse = _launch_fwd(q, k, v, rows, q_start, q_len, seg_start, sm_scale, block)
        ctx.save_for_backward(q, k, v, o, lse, seg_start, seg_end)
        ctx.sm_scale = sm_scale
        ctx.block = block
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seg_start, seg_end = ctx.saved_tensors
        dq, dk, dv = _launch_bwd(q, k, v, o, lse, do, seg_start, seg_end, ctx.sm_scale, ctx.block)
        return dq, dk, dv, None, None, None, None


def attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_ids: torch.Tensor,
    sm_scale: float | None = None,
    block: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Causal attention over packed rows, differentiable. q [B,H,S,D], k/v [B,KV,S,D], position_ids [B,S]
    (restarting at 0 where an example starts; -1 for right padding) -> [B,H,S,D].

    `block` forces the tile sizes, BLOCK_M = BLOCK_N or a (BLOCK_M, BLOCK_N) pair (tests); by default the
    GPU autotunes the forward.
    """
    _check(q, k, v)
    if k.shape[2] != q.shape[2] or position_ids.shape != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"packed attention needs k/v and position_ids over the same {q.shape[2]} tokens as q, got "
            f"k {tuple(k.shape)}, position_ids {tuple(position_ids.shape)}"
        )
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    seg_start, seg_end = segment_bounds(position_ids)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _PackedAttention.apply(q, k, v, seg_start.contiguous(), seg_end.contiguous(), scale, block)


def attention_prefill_cached(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    sm_scale: float | None = None,
    block: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """A prefill chunk over the slot cache, read in place (forward only).

    q [B,H,S,D]; k_cache/v_cache [num_slots, KV, max_len, D] already holding this chunk's keys/values;
    row b's queries are at positions q_start[b] .. q_start[b]+q_len[b]-1 of slot kv_index[b] and attend to
    positions 0..pos of it. Rows past q_len[b] (padding) come back as zeros.
    """
    _check(q, k_cache, v_cache)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    as_i32 = lambda t: t.to(device=q.device, dtype=torch.int32).contiguous()  # noqa: E731
    o, _ = _launch_fwd(
        q, k_cache, v_cache, as_i32(kv_index), as_i32(q_start), as_i32(q_len), None, scale, block
    )
    return o

"""Decode attention over the slot KV cache: Flash-Decoding (split the context, merge by log-sum-exp).

One query token per row. A decode batch has few rows, so one program per (row, head) would leave most of a GPU
idle at long contexts; instead each (row, KV head) is cut into NUM_SPLITS contiguous key ranges processed in
parallel, each writing a partial output and its base-2 log-sum-exp, and a second kernel merges them.

Grouped-query attention: a program loads every query head of its KV group as one [BLOCK_H, D] tile (BLOCK_H >=
16, the smallest `tl.dot` M), so a K/V tile is read from memory once per group, not once per query head.

Split boundaries are computed in the kernel from each row's own context length (no host sync in the decode
loop): split i covers [i * L, min((i + 1) * L, ctx)) with L = ceil(ctx / NUM_SPLITS) rounded up to BLOCK_N,
so the last split is ragged and trailing splits of short rows are empty (log-sum-exp -inf, weight 0).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels import SUPPORTED_HEAD_DIMS, check_runnable, interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    PART_O,
    PART_LSE,
    slots_ptr,
    ctx_len_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    num_kv_heads,
    qk_scale,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bk // num_kv_heads
    kvh = pid_bk % num_kv_heads
    slot = tl.load(slots_ptr + b).to(tl.int64)
    ctx = tl.load(ctx_len_ptr + b)
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_ok = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_ok[:, None],
        other=0.0,
    )
    k_base = K + slot * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + slot * stride_vb + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, k) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    # An empty split (ctx shorter than this split's start) leaves l = 0: write lse = -inf so the merge drops it.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    out = acc / l_safe[:, None]
    row = (b * num_kv_heads * GROUP + heads).to(tl.int64)  # [BLOCK_H] flat (b, h) index
    tl.store(
        PART_O + (row[:, None] * NUM_SPLITS + split) * HEAD_DIM + offs_d[None, :], out, mask=h_ok[:, None]
    )
    tl.store(PART_LSE + row * NUM_SPLITS + split, lse, mask=h_ok)


@triton.jit
def _decode_merge_kernel(
    PART_O,
    PART_LSE,
    Out,
    stride_ob,
    stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_heads
    h = pid % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    row = pid.to(tl.int64)
    lse = tl.load(PART_LSE + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    part = tl.load(
        PART_O + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None],
        other=0.0,
    )
    m = tl.max(lse, 0)
    # A row with no context at all (padding, ctx = 0) has every lse = -inf: its output is 0, not NaN.
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)  # [BLOCK_S]; empty splits weigh 0
    denom = tl.sum(w, 0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    out = tl.sum(part * w[:, None], 0) / denom
    tl.store(
        Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d, out.to(Out.dtype.element_ty)
    )


INTERPRET_BLOCK_N = 32
MAX_SPLITS = 64
# Fewer than this many keys per split and the merge costs more than the parallelism gains.
MIN_KEYS_PER_SPLIT = 256


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device) -> int:
    """Enough (row, KV head, split) programs to fill the GPU twice over, never splits under 256 keys.

    Uses the cache capacity, not the live lengths, so choosing needs no device-to-host copy.
    """
    if device.type != "cuda" or interpreting():
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = triton.cdiv(2 * sms, max(1, batch * num_kv_heads))
    return int(max(1, min(want, triton.cdiv(max_len, MIN_KEYS_PER_SPLIT), MAX_SPLITS)))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    ctx_len: torch.Tensor,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """q [B,H,D] (one token per row); k_cache/v_cache [num_slots, KV, max_len, D] read in place; row b attends
    to positions 0..ctx_len[b]-1 of slot slots[b] (ctx_len 0 -> zeros) -> [B,H,D]."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"decode expects q [B,H,D] and caches [slots,KV,L,D], got {tuple(q.shape)}, {tuple(k_cache.shape)}"
        )
    check_runnable("q", q)
    b, h, d = q.shape
    kv = k_cache.shape[1]
    if h % kv or k_cache.shape[-1] != d or d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"decode: heads {h} vs KV heads {kv}, head_dim {d} vs cache {k_cache.shape[-1]}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode: q and the caches need a contiguous last (head) dimension")
    group = h // kv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    splits = num_splits or default_num_splits(b, kv, k_cache.shape[2], q.device)
    on_gpu = q.device.type == "cuda" and not interpreting()
    bn = block_n or (64 if on_gpu else INTERPRET_BLOCK_N)
    slots_i = slots.to(device=q.device, dtype=torch.int32).contiguous()
    ctx_i = ctx_len.to(device=q.device, dtype=torch.int32).contiguous()
    part_o = torch.empty((b, h, splits, d), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((b, h, splits), device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    extra = dict(num_warps=4, num_stages=2) if on_gpu else {}
    _decode_split_kernel[(b * kv, splits)](
        q, k_cache, v_cache, part_o, part_lse, slots_i, ctx_i,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        kv, scale * LOG2E,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, NUM_SPLITS=splits,
        IEEE=q.dtype == torch.float32, BLOCK_N=bn, **extra,
    )  # fmt: skip
    _decode_merge_kernel[(b * h,)](
        part_o, part_lse, out, out.stride(0), out.stride(1), h,
        HEAD_DIM=d, NUM_SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)),
    )  # fmt: skip
    return out

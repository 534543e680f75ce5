"""Pure-torch references for every kernel in this package (no triton).

They state the semantics the kernels implement, in the plainest torch: full score matrices, explicit masks.
Tests run them twice: in float64 (the truth) and in the kernel's dtype (the error a same-precision torch
implementation makes, which bounds the error the kernel is allowed).
"""

from __future__ import annotations

import math

import torch


def segment_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed-example bounds per token from positions that restart at 0 where an example starts.

    position_ids [B, S] -> (seg_start, seg_end) int32 [B, S]: token i belongs to the example spanning
    [seg_start[i], seg_end[i]). Right padding (position -1) continues the last example; nothing real attends
    to it because it comes after every real token.
    """
    b, s = position_ids.shape
    idx = torch.arange(s, device=position_ids.device).expand(b, s)
    starts = position_ids == 0
    seg_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    # Next example start strictly after i, or S: a reverse running minimum over the start indices shifted by one.
    nxt = torch.where(starts, idx, torch.full_like(idx, s))
    nxt = torch.cat([nxt[:, 1:], torch.full_like(nxt[:, :1], s)], dim=1)
    seg_end = nxt.flip(1).cummin(dim=1).values.flip(1)
    return seg_start.to(torch.int32), seg_end.to(torch.int32)


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, KV, L, D] -> [B, KV * group, L, D]: query head h reads KV head h // group."""
    return x.repeat_interleave(group, dim=1)


def attention_packed_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_ids: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """No-cache attention over packed rows. q [B,H,S,D], k/v [B,KV,S,D], position_ids [B,S] -> [B,H,S,D].

    Token i attends to token j iff j <= i and both lie in the same packed example.
    """
    b, h, s, d = q.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    seg_start, _ = segment_bounds(position_ids)
    j = torch.arange(s, device=q.device)
    allowed = (j[None, None, :] <= j[None, :, None]) & (j[None, None, :] >= seg_start[:, :, None].long())
    kk, vv = _expand_kv(k, h // k.shape[1]), _expand_kv(v, h // k.shape[1])
    scores = torch.matmul(q, kk.transpose(-1, -2)) * scale  # [B, H, S, S]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vv)


def attention_cached_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Chunked prefill / decode over a slot cache.

    q [B,H,S,D]; k_cache/v_cache [num_slots, KV, max_len, D]; row b's queries sit at positions
    q_start[b] .. q_start[b] + q_len[b] - 1 and attend to cache[slots[b], :, 0:pos+1]. Rows past q_len[b] are
    padding and come back as zeros.
    """
    b, h, s, d = q.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros_like(q)
    for row in range(b):
        n, start = int(q_len[row]), int(q_start[row])
        if n == 0:
            continue
        kv_len = start + n
        kk = _expand_kv(k_cache[int(slots[row])][None, :, :kv_len], h // k_cache.shape[1])[0]  # [H, L, D]
        vv = _expand_kv(v_cache[int(slots[row])][None, :, :kv_len], h // v_cache.shape[1])[0]
        qpos = torch.arange(start, kv_len, device=q.device)
        allowed = torch.arange(kv_len, device=q.device)[None, :] <= qpos[:, None]  # [n, L]
        scores = torch.matmul(q[row, :, :n], kk.transpose(-1, -2)) * scale  # [H, n, L]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out[row, :, :n] = torch.matmul(torch.softmax(scores, dim=-1), vv)
    return out


def decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    ctx_len: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """One query token per row: q [B,H,D] attends to cache[slots[b], :, 0:ctx_len[b]] -> [B,H,D]."""
    q_start = (ctx_len - 1).clamp(min=0)
    q_len = (ctx_len > 0).long()
    return attention_cached_ref(q[:, :, None], k_cache, v_cache, slots, q_start, q_len, sm_scale)[:, :, 0]


def add_rmsnorm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (rounded to x's dtype, as the unfused model stores it); y = rmsnorm(h) * weight.

    Returns (y, h). The norm is computed in fp32 (or fp64 for fp64 input) and y is rounded once, to x's dtype.
    """
    h = x if residual is None else x + residual
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    h32 = h.to(acc)
    y = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    return y.to(x.dtype), h


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding (`rotate_half`). x [B,H,S,D]; cos/sin [B,S,D] gathered at each token's
    position (both halves equal, as the model's tables) or [B,S,D/2]. Computed in x's dtype, as the model does."""
    half = x.shape[-1] // 2
    c, s_ = cos[..., :half][:, None].to(x.dtype), sin[..., :half][:, None].to(x.dtype)  # [B, 1, S, D/2]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_], dim=-1)

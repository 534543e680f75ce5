"""The model's view of the kernels: what `model.transformer.attention(..., backend="triton")` calls.

Translates the model's conventions (position_ids with -1 for right padding, a slot cache already holding the
new keys/values) into the kernels' (segment bounds, per-row query offsets and lengths). Everything here is
torch ops on the device, so a decode step makes no host sync. Positions within a cached row are assumed
contiguous (q_start, q_start+1, ...), which is how the engine builds prefill chunks and decode steps.
"""

from __future__ import annotations

import torch

from kernels.attention import attention_packed as _packed
from kernels.attention import attention_prefill_cached
from kernels.decode import decode_attention


def attention_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """No cache (training): q [B,H,S,D], k/v [B,KV,S,D]; examples packed by positions restarting at 0."""
    return _packed(q, k, v, position_ids)


def attention_cached(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """Prefill chunk or decode step over the slot cache (k_cache/v_cache [num_slots, KV, max_len, D], already
    written). q [B,H,S,D]; position_ids [B,S], -1 = padding (its output is zeros)."""
    valid = position_ids >= 0
    q_len = valid.sum(dim=1)  # [B]
    if q.shape[2] == 1:
        # Decode: context = every position up to and including this token's (0 for a padding row).
        ctx_len = torch.where(valid[:, 0], position_ids[:, 0] + 1, torch.zeros_like(q_len))
        return decode_attention(q[:, :, 0], k_cache, v_cache, slots, ctx_len).unsqueeze(2)
    q_start = position_ids[:, 0].clamp(min=0)
    return attention_prefill_cached(q, k_cache, v_cache, slots, q_start, q_len)

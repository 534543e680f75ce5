"""The KV cache: preallocated per slot, written by position, never grown or copied in the decode loop.

A batch names the slots its rows use, so rows of different lengths share one forward and sequences join and
leave between steps without touching the others (gpt-fast's KVCache, made multi-slot).
"""

from __future__ import annotations

import torch

from model.config import ModelConfig


class KVCache:
    """k, v: [num_layers, num_slots, num_kv_heads, max_len, head_dim]; `k[layer]` is a contiguous slot view.

    `lengths[slot]` counts the positions written in that slot (the next position to write).
    """

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_len = max_len or config.max_position_embeddings
        if self.max_len > config.max_position_embeddings:
            raise ValueError(
                f"max_len {self.max_len} exceeds max_position_embeddings {config.max_position_embeddings}"
            )
        shape = (
            config.num_hidden_layers,
            num_slots,
            config.num_key_value_heads,
            self.max_len,
            config.head_dim,
        )
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.num_slots = num_slots

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def reset(self, slots: list[int] | torch.Tensor | None = None) -> None:
        """Free slots: only the length is reset; stale entries past it are never read."""
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(slots, dtype=torch.long, device=self.lengths.device)] = 0

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (prefix-cache hit)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        self.lengths[dst] = length

    def write(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ):
        """Write new keys/values k, v [B, KV, S, D] at `positions` [B, S] of `slots` [B]; positions < 0 are padding."""
        valid = positions >= 0  # [B, S]
        b_idx, s_idx = valid.nonzero(as_tuple=True)
        slot_idx = slots[b_idx]
        pos_idx = positions[b_idx, s_idx]
        # Advanced indexing [slot, :, pos] -> [N, KV, D]; k.transpose(1, 2)[b, s] -> [N, KV, D].
        self.k[layer][slot_idx, :, pos_idx] = k.transpose(1, 2)[b_idx, s_idx].to(self.k.dtype)
        self.v[layer][slot_idx, :, pos_idx] = v.transpose(1, 2)[b_idx, s_idx].to(self.v.dtype)

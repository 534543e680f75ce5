"""The PyTorch runner: `model.transformer` over the multi-slot `model.cache.KVCache`.

SDPA on the CPU; on CUDA the Triton attention kernels when `kernels` says they are usable. The last-position
logits only: the LM head runs on one hidden state per prefill row, not on the whole chunk (at vocab 8192 and a
256-token chunk that is 256x fewer head FLOPs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.cache import KVCache
from model.checkpoint import load_checkpoint
from model.errors import ConfigError
from model.generate import ragged_batch


class TorchRunner:
    def __init__(
        self, path: str | Path, *, num_slots: int, max_len: int = 0, threads: int = 1, device: str = "cpu"
    ) -> None:
        torch.set_num_threads(threads)
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"device {device!r}: {exc}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked for, but torch sees no CUDA device")
        from kernels import select_attn_backend

        backend = select_attn_backend(self.device)  # triton on CUDA when installed, else sdpa (logged)
        self.model = load_checkpoint(path, device=self.device, attn_backend=backend)
        self.attn_backend = backend
        self.config = self.model.config
        self.num_slots = num_slots
        self.max_len = max_len or self.config.max_position_embeddings
        if self.max_len > self.config.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {self.max_len} exceeds the model's window {self.config.max_position_embeddings}"
            )
        dtype = self.model.embed_tokens.weight.dtype
        self.cache = KVCache(self.config, num_slots, self.max_len, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def prefill(
        self, rows: list[list[int]], slots: list[int], starts: list[int], all_logits: bool = False
    ) -> np.ndarray | list[np.ndarray]:
        ids, pos = ragged_batch(rows, starts, pad_id=0)  # [B, S] each, padding at position -1
        ids, pos = ids.to(self.device), pos.to(self.device)
        slot_t = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        hidden = self.model.forward_hidden(ids, pos, self.cache, slot_t)  # [B, S, H]
        if all_logits:
            out = self.model.lm_head(hidden).float().cpu().numpy()  # [B, S, V]
            return [out[i, : len(r)] for i, r in enumerate(rows)]
        last = torch.as_tensor([len(r) - 1 for r in rows], device=self.device)
        h_last = hidden[torch.arange(len(rows), device=self.device), last]  # [B, H]
        return self.model.lm_head(h_last).float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, tokens: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(self.device)[
            :, None
        ]  # [B, 1]
        pos = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(self.device)[:, None]
        slot_t = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)
        logits = self.model(ids, pos, self.cache, slot_t)  # [B, 1, V]
        return logits[:, 0].float().cpu().numpy()

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        self.cache.copy_prefix(src_slot, dst_slot, length)

    def release(self, slot: int) -> None:
        self.cache.reset([slot])

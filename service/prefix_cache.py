"""Prefix cache: prompts' keys/values kept in reserved KV slots (a bounded LRU), copied into a new sequence's
slot when its prompt starts with the same tokens, so a shared system prompt or knowledge-base passage is
prefilled once.

Each entry is one whole prompt held in its own slot; a lookup takes the entry with the longest common token
prefix (a system prompt shared by prompts that differ after it matches every one of them). With 4-16 entries a
linear scan over numpy comparisons is cheaper than a radix tree and has nothing to get wrong.

Torch-free.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from service.runners.base import Runner


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class PrefixCache:
    def __init__(self, runner: Runner, slots: list[int], min_tokens: int = 16) -> None:
        self.runner = runner
        self.free = list(slots)
        self.min_tokens = min_tokens
        self.entries: OrderedDict[int, np.ndarray] = OrderedDict()  # slot -> prompt tokens, LRU first

    def lookup(self, prompt: list[int], dst_slot: int) -> int:
        """Copy the longest cached prefix of `prompt` into `dst_slot`; the number of positions copied (0: miss).
        At least one prompt token is always left to compute: its logits choose the first output token."""
        if not self.entries:
            return 0
        p = np.asarray(prompt, dtype=np.int64)
        best_slot, best = -1, 0
        for slot, tokens in self.entries.items():
            n = common_prefix(p, tokens)
            if n > best:
                best_slot, best = slot, n
        best = min(best, len(prompt) - 1)
        if best < self.min_tokens:
            return 0
        self.runner.copy_prefix(best_slot, dst_slot, best)
        self.entries.move_to_end(best_slot)
        return best

    def insert(self, prompt: list[int], src_slot: int) -> None:
        """Keep a fully prefilled prompt (unless an entry already covers it), evicting the least recently used."""
        if len(prompt) < self.min_tokens or (not self.free and not self.entries):
            return
        p = np.asarray(prompt, dtype=np.int64)
        for slot, tokens in self.entries.items():
            if common_prefix(p, tokens) == len(p):
                self.entries.move_to_end(slot)
                return
        if self.free:
            slot = self.free.pop()
        else:
            slot, _ = self.entries.popitem(last=False)
        self.runner.copy_prefix(src_slot, slot, len(prompt))
        self.entries[slot] = p

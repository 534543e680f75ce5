"""Reference generation: one ragged prefill, then decode steps through the KV cache, sampling with the shared
sampling module. The export parity checks and evaluation use it; the service's engine does the same work with
continuous batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.cache import KVCache
from model.sampling import GREEDY, SamplingParams, make_rng, sample
from model.transformer import Transformer


@dataclass
class Generation:
    tokens: list[int]
    finish_reason: str  # "stop" (a stop token) or "length"
    # With return_logits: the logits [V] that chose each token (float32 numpy).
    logits: list[np.ndarray] = field(default_factory=list)


def ragged_batch(rows: Sequence[Sequence[int]], starts: Sequence[int] | None = None, pad_id: int = 0):
    """Right-pad rows into input_ids [B, S] and position_ids [B, S] (padding at position -1)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        start = 0 if starts is None else starts[i]
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        pos[i, : len(r)] = torch.arange(start, start + len(r))
    return ids, pos


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams | Sequence[SamplingParams] = GREEDY,
    stop_ids: Sequence[int] = (),
    return_logits: bool = False,
) -> list[Generation]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    n = len(prompts)
    params = list(params) if isinstance(params, Sequence) else [params] * n
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > model.config.max_position_embeddings:
        raise ValueError(
            f"generate: {longest} positions exceed the context window {model.config.max_position_embeddings}"
        )
    device = model.embed_tokens.weight.device
    cache = KVCache(model.config, n, longest, dtype=model.embed_tokens.weight.dtype, device=device)
    rngs = [make_rng(p.seed) for p in params]
    results = [Generation([], "length") for _ in range(n)]
    stop = set(stop_ids)

    ids, pos = ragged_batch(prompts)
    logits = model(ids.to(device), pos.to(device), cache, torch.arange(n, device=device))
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    step_logits = logits[torch.arange(n, device=device), last].float().cpu().numpy()  # [n, V]
    active = list(range(n))
    for _ in range(max_new_tokens):
        tokens = sample(
            step_logits,
            [params[i] for i in active],
            [rngs[i] for i in active],
            output_tokens=[results[i].tokens for i in active],
            prompt_tokens=[prompts[i] for i in active],
        )
        still = []
        for row, i in enumerate(active):
            tok = int(tokens[row])
            results[i].tokens.append(tok)
            if return_logits:
                results[i].logits.append(step_logits[row])
            if tok in stop:
                results[i].finish_reason = "stop"
            elif len(results[i].tokens) < max_new_tokens:
                still.append((row, i))
        if not still:
            break
        active = [i for _, i in still]
        next_ids = torch.tensor([[results[i].tokens[-1]] for i in active], device=device)
        next_pos = torch.tensor(
            [[len(prompts[i]) + len(results[i].tokens) - 1] for i in active], device=device
        )
        step_logits = (
            model(next_ids, next_pos, cache, torch.tensor(active, device=device))[:, -1].float().cpu().numpy()
        )
    return results

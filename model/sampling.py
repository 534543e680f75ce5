"""The one sampling implementation (numpy, vectorized over the batch), used by every path that samples:
reference generation, evaluation, export parity checks and the service. A seed means the same everywhere.

Order (as vLLM and transformers apply them): penalties -> temperature (greedy below GREEDY_EPS) ->
top-k -> top-p -> min-p -> sample with the row's own seeded generator. No Python loop over the vocabulary;
the only per-row loop draws one uniform number per row from that row's generator.

Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Temperatures below this are greedy (argmax), as in vLLM.
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # CTRL-style, over prompt and output tokens; 1.0: off
    frequency_penalty: float = 0.0  # OpenAI-style, over output tokens
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


GREEDY = SamplingParams(temperature=0.0)


def make_rng(seed: int | None) -> np.random.Generator:
    """One generator per request/row: PCG64 seeded from `seed` (fresh entropy when None)."""
    return np.random.default_rng(seed)


def _token_counts(rows: Sequence[Sequence[int]], shape: tuple[int, int]) -> np.ndarray:
    counts = np.zeros(shape, dtype=np.float32)
    lengths = [len(r) for r in rows]
    if sum(lengths):
        row_idx = np.repeat(np.arange(len(rows)), lengths)
        tok_idx = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows if len(r)])
        np.add.at(counts, (row_idx, tok_idx), 1.0)
    return counts


def apply_penalties(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    output_tokens: Sequence[Sequence[int]] | None,
    prompt_tokens: Sequence[Sequence[int]] | None,
) -> np.ndarray:
    b, v = logits.shape
    rep = np.array([p.repetition_penalty for p in params], dtype=np.float32)[:, None]
    freq = np.array([p.frequency_penalty for p in params], dtype=np.float32)[:, None]
    pres = np.array([p.presence_penalty for p in params], dtype=np.float32)[:, None]
    if output_tokens is None or (np.all(rep == 1) and not freq.any() and not pres.any()):
        return logits
    logits = logits.copy()
    out_counts = _token_counts(output_tokens, (b, v))
    if freq.any() or pres.any():
        logits -= freq * out_counts + pres * (out_counts > 0)
    if np.any(rep != 1):
        seen = out_counts > 0
        if prompt_tokens is not None:
            seen |= _token_counts(prompt_tokens, (b, v)) > 0
        penalized = np.where(logits > 0, logits / rep, logits * rep)
        logits = np.where(seen, penalized, logits)
    return logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def filtered_probs(logits: np.ndarray, params: Sequence[SamplingParams]) -> np.ndarray:
    """Probabilities after temperature, top-k, top-p and min-p (rows renormalized), for non-greedy rows."""
    b, v = logits.shape
    temp = np.array([max(p.temperature, GREEDY_EPS) for p in params], dtype=np.float32)[:, None]
    scaled = logits / temp
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    top_k = np.array([p.top_k if 0 < p.top_k < v else v for p in params])
    top_p = np.array([p.top_p for p in params], dtype=np.float32)
    if np.any(top_k < v) or np.any(top_p < 1):
        order = np.argsort(-probs, axis=-1, kind="stable")  # [B, V] descending
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        rank = np.arange(v)[None, :]
        keep_sorted = rank < top_k[:, None]
        # top-p: keep the smallest prefix whose mass reaches top_p (the token that crosses it is kept).
        mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p
        keep_sorted &= mass_before < top_p[:, None]
        keep_sorted[:, 0] = True
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
    min_p = np.array([p.min_p for p in params], dtype=np.float32)[:, None]
    if min_p.any():
        probs = np.where(probs >= min_p * probs.max(axis=-1, keepdims=True), probs, 0.0)
    return probs / probs.sum(axis=-1, keepdims=True)


def sample(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    rngs: Sequence[np.random.Generator],
    output_tokens: Sequence[Sequence[int]] | None = None,
    prompt_tokens: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """Next token per row. logits [B, V] (any float dtype; computed in float32) -> int64 [B]."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != len(params) or len(rngs) != len(params):
        raise ValueError(f"sample: logits {logits.shape} vs {len(params)} params and {len(rngs)} generators")
    logits = apply_penalties(logits, params, output_tokens, prompt_tokens)
    tokens = logits.argmax(axis=-1)
    greedy = np.array([p.greedy for p in params])
    if greedy.all():
        return tokens
    rows = np.flatnonzero(~greedy)
    probs = filtered_probs(logits[rows], [params[i] for i in rows])
    u = np.array([rngs[i].random() for i in rows], dtype=np.float64)[:, None]
    cdf = np.cumsum(probs, axis=-1, dtype=np.float64)
    # Inverse CDF: the first token whose cumulative mass exceeds u (scaled by the row total for rounding).
    choice = (cdf <= u * cdf[:, -1:]).sum(axis=-1)
    tokens[rows] = np.minimum(choice, probs.shape[1] - 1)
    return tokens


def token_logprobs(
    logits: np.ndarray, tokens: np.ndarray, top_n: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model log-probabilities (raw logits, before penalties and temperature, as OpenAI and vLLM report them):
    the chosen tokens' [B], and the top_n ids [B, top_n] with their log-probabilities [B, top_n]."""
    lp = log_softmax(np.asarray(logits, dtype=np.float32))
    chosen = np.take_along_axis(lp, np.asarray(tokens)[:, None], axis=-1)[:, 0]
    if top_n <= 0:
        return chosen, np.zeros((len(lp), 0), dtype=np.int64), np.zeros((len(lp), 0), dtype=np.float32)
    top_ids = np.argpartition(-lp, top_n - 1, axis=-1)[:, :top_n]
    top_lp = np.take_along_axis(lp, top_ids, axis=-1)
    order = np.argsort(-top_lp, axis=-1, kind="stable")
    return chosen, np.take_along_axis(top_ids, order, -1), np.take_along_axis(top_lp, order, -1)

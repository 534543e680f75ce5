"""Rank classification math: label log-likelihoods → calibrated probabilities, temperature fitting, ECE.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T, fitted on a
validation split by minimising the negative log-likelihood of softmax(scores / T). The NLL is convex in
beta = 1/T, so a golden-section search over log(beta) finds the optimum; 60 iterations shrink the bracket
[e^-6, e^6] below 1e-11. ECE uses 15 equal-width confidence bins, as that paper does.
Torch-free (numpy only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ECE_BINS = 15
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def softmax(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(scores, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(scores: np.ndarray, labels: Sequence[int], temperature: float) -> float:
    """Mean negative log-likelihood of the true labels under softmax(scores / temperature)."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    m = z.max(axis=1, keepdims=True)
    log_norm = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    idx = np.asarray(labels, dtype=np.int64)
    return float(np.mean(log_norm - z[np.arange(len(idx)), idx]))


def fit_temperature(scores: np.ndarray, labels: Sequence[int], iterations: int = 60) -> float:
    """The T > 0 minimising `nll(scores, labels, T)`, searched over T in [e^-6, e^6]."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"need scores [N, L] with N = len(labels) > 0; got {scores.shape}, {len(labels)} labels"
        )

    def f(u: float) -> float:
        return nll(scores, labels, math.exp(-u))  # u = log(1/T)

    lo, hi = -6.0, 6.0
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = f(b)
    return math.exp(-(lo + hi) / 2.0)


def expected_calibration_error(probs: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> float:
    """sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)| over equal-width bins of the top probability."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 goes to bin 0.
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def continuation_logprob(logits: np.ndarray, tokens: Sequence[int], prompt_len: int) -> float:
    """Sum of log p(tokens[j] | tokens[:j]) for j >= prompt_len, given the logits [len(tokens), V] of the
    whole row (position j's logits predict token j + 1)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[0] != len(tokens):
        raise ValueError(f"logits cover {logits.shape[0]} positions, row has {len(tokens)} tokens")
    if not 0 < prompt_len < len(tokens):
        raise ValueError(
            f"prompt_len {prompt_len} must leave a non-empty continuation of {len(tokens)} tokens"
        )
    pred = logits[prompt_len - 1 : len(tokens) - 1]
    m = pred.max(axis=1, keepdims=True)
    log_norm = (m + np.log(np.exp(pred - m).sum(axis=1, keepdims=True)))[:, 0]
    target = np.asarray(tokens[prompt_len:], dtype=np.int64)
    return float(np.sum(pred[np.arange(len(target)), target] - log_norm))

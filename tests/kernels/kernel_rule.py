"""The tolerance rule of the kernel tests (FlashAttention's, made exact) and the pairwise shape subsets."""

from __future__ import annotations

import itertools

import torch


def assert_rule(
    name: str, out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor, valid=None
) -> float:
    """max|out - ref64| <= 2 * max|same_dtype - ref64| + 1e-6, where ref64 is the float64 reference and
    same_dtype the pure-torch implementation run in the kernel's dtype. `valid` masks entries that matter."""
    err = (out.double() - ref64).abs()
    base = (same_dtype.double() - ref64).abs()
    if valid is not None:
        err, base = err * valid, base * valid
    assert torch.isfinite(out.double() * (valid if valid is not None else 1)).all(), (
        f"{name}: non-finite output"
    )
    e, b = err.max().item(), base.max().item()
    bound = 2 * b + 1e-6
    assert e <= bound, (
        f"{name}: max error {e:.3g} > {bound:.3g} (2 x torch {same_dtype.dtype} error {b:.3g} + 1e-6)"
    )
    return e


def pairwise(factors: dict[str, list]) -> list[dict]:
    """A small set of cases covering every pair of values of every two factors (greedy all-pairs)."""
    names = list(factors)
    uncovered = {
        (a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in factors[a] for vb in factors[b]
    }
    candidates = [dict(zip(names, values, strict=True)) for values in itertools.product(*factors.values())]
    cases = []

    def gain(case):
        return sum((a, case[a], b, case[b]) in uncovered for a, b in itertools.combinations(names, 2))

    while uncovered:
        best = max(candidates, key=gain)
        cases.append(best)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
    return cases


def full(factors: dict[str, list]) -> list[dict]:
    names = list(factors)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*factors.values())]


def case_id(case: dict) -> str:
    return "-".join(f"{k}{v}".replace("torch.", "") for k, v in case.items())

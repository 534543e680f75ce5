"""Mixing weights (T5 examples-proportional with cap and temperature) and the deterministic task mixer."""

import math

import pytest

from model.errors import ConfigError
from training.data.mixing import TaskMixer, mixing_weights, weights_from_manifest


def test_weights_follow_t5_formula_with_cap_and_temperature():
    counts = {"qa": 9000, "translation": 300, "content": 100, "dialog": 0}
    w = mixing_weights(counts, cap=1000, temperature=1.0)
    # min(n, K): 1000, 300, 100, 0 → 1000/1400 ...
    assert w == pytest.approx(
        {"qa": 1000 / 1400, "translation": 300 / 1400, "content": 100 / 1400, "dialog": 0.0}
    )
    w2 = mixing_weights(counts, cap=1000, temperature=2.0)
    roots = {"qa": 1000**0.5, "translation": 300**0.5, "content": 100**0.5}
    total = sum(roots.values())
    assert w2["qa"] == pytest.approx(roots["qa"] / total)
    assert w2["content"] == pytest.approx(roots["content"] / total)
    assert list(w2) == sorted(w2)
    # No cap: plain proportions; a very high temperature tends to equal mixing over non-empty tasks.
    assert mixing_weights({"a": 3, "b": 1}, cap=0)["a"] == pytest.approx(0.75)
    hot = mixing_weights({"a": 10_000, "b": 10}, cap=0, temperature=1e6)
    assert hot["a"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    ("counts", "cap", "temperature", "needle"),
    [({"a": 1}, None, 0.0, "temperature"), ({"a": 1}, -1, 1.0, "cap"), ({"a": 0}, None, 1.0, "0 examples")],
)
def test_bad_mixing_parameters_are_named(counts, cap, temperature, needle):
    with pytest.raises(ConfigError, match=needle):
        mixing_weights(counts, cap=cap, temperature=temperature)


def test_mixer_frequencies_match_weights_and_cover_each_task_before_repeating():
    records = {"a": list(range(50)), "b": list(range(100, 120)), "c": list(range(200, 205))}
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    mixer = TaskMixer(records, weights, seed=7)
    n = 20_000
    draws = mixer.take(n)
    for task, p in weights.items():
        count = sum(1 for t, _ in draws if t == task)
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) < 5 * sigma, (task, count)
        assert all(r in records[task] for t, r in draws if t == task)
    # Within a task, the first len(task) draws are a permutation: nothing repeats before a full pass.
    first_c = [r for t, r in draws if t == "c"][:5]
    assert sorted(first_c) == records["c"]


def test_mixer_is_deterministic_and_resumes_exactly():
    records = {"a": list(range(13)), "b": list(range(7))}
    weights = {"a": 0.5, "b": 0.5}
    full = TaskMixer(records, weights, seed=3).take(100)
    assert full == TaskMixer(records, weights, seed=3).take(100)
    assert full != TaskMixer(records, weights, seed=4).take(100)
    first = TaskMixer(records, weights, seed=3)
    head = first.take(37)
    state = first.state_dict()
    resumed = TaskMixer(records, weights, seed=3)
    resumed.load_state_dict(state)
    assert head + resumed.take(63) == full


def test_mixer_rejects_weights_for_missing_tasks_and_wrong_state():
    with pytest.raises(ConfigError, match="no records: b"):
        TaskMixer({"a": [1]}, {"a": 0.5, "b": 0.5})
    state = TaskMixer({"a": [1, 2]}, {"a": 1.0}, seed=1).state_dict()
    with pytest.raises(ConfigError, match="seed"):
        TaskMixer({"a": [1, 2]}, {"a": 1.0}, seed=2).load_state_dict(state)


def test_weights_from_manifest_validates():
    assert weights_from_manifest({"mixing": {"weights": {"qa": 1}}}) == {"qa": 1.0}
    with pytest.raises(ConfigError, match="mixing.weights"):
        weights_from_manifest({})

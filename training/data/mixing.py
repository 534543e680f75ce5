"""Multi-task mixing: the one implementation of the task weights the dataset build writes and the trainer applies.

Examples-proportional mixing with an artificial cap K and a temperature T (Raffel et al. 2020, T5 §3.5.2;
FLAN uses the same rule): task i is drawn with probability proportional to min(n_i, K) ** (1 / T).
T = 1 is plain examples-proportional (up to the cap); T → ∞ tends to equal mixing. The dataset build calls
`mixing_weights` and stores the result in manifest.json under "mixing"; the trainer reads those weights back and
walks `TaskMixer`, so both sides agree by construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from model.errors import ConfigError


def mixing_weights(
    counts: Mapping[str, int], cap: int | None = None, temperature: float = 1.0
) -> dict[str, float]:
    """Probability of drawing each task: min(n, cap) ** (1 / temperature), normalized; tasks with no examples
    get 0. `cap` None or 0 means no cap. Keys come back sorted so the manifest is byte-stable."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise ConfigError(f"mixing temperature must be a positive finite number, got {temperature!r}")
    if cap is not None and cap < 0:
        raise ConfigError(f"mixing cap must be >= 0 (0 = no cap), got {cap!r}")
    raw: dict[str, float] = {}
    for task in sorted(counts):
        n = int(counts[task])
        if n < 0:
            raise ConfigError(f"mixing count for task '{task}' is negative: {n}")
        effective = min(n, cap) if cap else n
        raw[task] = float(effective) ** (1.0 / temperature) if effective > 0 else 0.0
    total = sum(raw.values())
    if total == 0:
        raise ConfigError("mixing: every task has 0 examples; nothing to train on")
    return {task: value / total for task, value in raw.items()}


class TaskMixer:
    """Deterministic mixture order over per-task record lists.

    Each draw picks a task with the given weights, then that task's next record from a per-task permutation that is
    reshuffled at every pass over the task (so a small task repeats only after all its records were seen). The
    whole state is a few integers and numpy generator states: `state_dict()` / `load_state_dict()` resume the
    exact same stream, which is what the trainer saves beside a checkpoint.
    """

    def __init__(
        self, records_by_task: Mapping[str, Sequence[Any]], weights: Mapping[str, float], seed: int = 0
    ):
        tasks = sorted(t for t in records_by_task if weights.get(t, 0.0) > 0 and len(records_by_task[t]) > 0)
        missing = sorted(t for t, w in weights.items() if w > 0 and len(records_by_task.get(t, ())) == 0)
        if missing:
            raise ConfigError(f"mixing weights name tasks with no records: {', '.join(missing)}")
        if not tasks:
            raise ConfigError("TaskMixer: no task has both a positive weight and records")
        self.tasks = tasks
        self.items = {t: list(records_by_task[t]) for t in tasks}
        w = np.array([float(weights[t]) for t in tasks], dtype=np.float64)
        self.probs = w / w.sum()
        self.seed = int(seed)
        self._choice = np.random.default_rng([self.seed, 0])
        # One generator per task, keyed by the task's position so adding a task elsewhere changes nothing here.
        self._shuffle = {t: np.random.default_rng([self.seed, 1, i]) for i, t in enumerate(tasks)}
        self._perm = {t: self._shuffle[t].permutation(len(self.items[t])) for t in tasks}
        self._cursor = dict.fromkeys(tasks, 0)
        self._epoch = dict.fromkeys(tasks, 0)
        self.drawn = 0

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self

    def __next__(self) -> tuple[str, Any]:
        task = self.tasks[int(self._choice.choice(len(self.tasks), p=self.probs))]
        if self._cursor[task] == len(self._perm[task]):
            self._perm[task] = self._shuffle[task].permutation(len(self.items[task]))
            self._cursor[task] = 0
            self._epoch[task] += 1
        item = self.items[task][int(self._perm[task][self._cursor[task]])]
        self._cursor[task] += 1
        self.drawn += 1
        return task, item

    def take(self, n: int) -> list[tuple[str, Any]]:
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "tasks": list(self.tasks),
            "drawn": self.drawn,
            "choice": self._choice.bit_generator.state,
            "shuffle": {t: g.bit_generator.state for t, g in self._shuffle.items()},
            "perm": {t: p.tolist() for t, p in self._perm.items()},
            "cursor": dict(self._cursor),
            "epoch": dict(self._epoch),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["tasks"]) != self.tasks or int(state["seed"]) != self.seed:
            raise ConfigError(
                f"mixer state is for tasks {state['tasks']} seed {state['seed']}, "
                f"this mixer has tasks {self.tasks} seed {self.seed}"
            )
        for t in self.tasks:
            if len(state["perm"][t]) != len(self.items[t]):
                raise ConfigError(
                    f"mixer state: task '{t}' had {len(state['perm'][t])} records, now {len(self.items[t])}"
                )
        self._choice.bit_generator.state = state["choice"]
        for t in self.tasks:
            self._shuffle[t].bit_generator.state = state["shuffle"][t]
            self._perm[t] = np.asarray(state["perm"][t], dtype=np.int64)
        self._cursor = {t: int(state["cursor"][t]) for t in self.tasks}
        self._epoch = {t: int(state["epoch"][t]) for t in self.tasks}
        self.drawn = int(state["drawn"])


def mixture_sampler(
    records_by_task: Mapping[str, Sequence[Any]], weights: Mapping[str, float], seed: int = 0
) -> Iterator[tuple[str, Any]]:
    """Endless (task, record) stream in mixture order; a thin alias of `TaskMixer` for callers without resume."""
    return TaskMixer(records_by_task, weights, seed)


def weights_from_manifest(manifest: Mapping[str, Any]) -> dict[str, float]:
    """The mixing weights a dataset build wrote (manifest.json "mixing.weights"), validated."""
    try:
        weights = manifest["mixing"]["weights"]
    except (KeyError, TypeError):
        raise ConfigError(
            "manifest.json has no 'mixing.weights'; rebuild the dataset with `instructlm data build`"
        ) from None
    if not isinstance(weights, dict) or not all(
        isinstance(v, (int, float)) and v >= 0 for v in weights.values()
    ):
        raise ConfigError("manifest.json 'mixing.weights' must map task names to non-negative numbers")
    return {str(k): float(v) for k, v in weights.items()}

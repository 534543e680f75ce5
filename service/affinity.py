"""`engine_cpus`: give the engine (its thread and the runner's intra-op threads) CPUs of its own, and the HTTP side
(event loop, tokenizer threads) the rest, as vLLM's CPU backend does with VLLM_CPU_OMP_THREADS_BIND and
llama.cpp with --cpu-mask: the forward pass then never shares a core with request handling.

Off by default: on a Kubernetes node without exclusive cores (the static CPU manager policy), a container's CPU
numbers are shared with other pods, and pinning to one of them can only hurt. On the 2-core machine, 16
streams (docs/BENCHMARKS.md), served / bare batch-16 tokens/s: two servers, 8 interleaved sweeps each, 0.820
[0.806-0.851] pinned vs 0.802 [0.757-0.833] not; two whole bench/serve.py runs, 0.81 pinned vs 0.82 not. A
gain of a few percent at most, inside this machine's noise; what it buys for sure is that HTTP work never
preempts a forward.

Torch-free.
"""

from __future__ import annotations

import os

from model.errors import ConfigError


def parse_cpu_list(spec: str) -> set[int]:
    """ "1", "2-5,7" -> {1}, {2, 3, 4, 5, 7}; ConfigError naming the setting on anything else."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ConfigError(
                f"serve settings: engine_cpus {spec!r}: expected 'auto', '' (off) or a CPU list like '1' or "
                f"'2-5,7'"
            ) from None
        if a < 0 or b < a:
            raise ConfigError(f"serve settings: engine_cpus {spec!r}: bad range {part!r}")
        cpus.update(range(a, b + 1))
    return cpus


def cpu_plan(spec: str, threads: int, available: set[int] | None = None) -> tuple[set[int], set[int]] | None:
    """(engine CPUs, HTTP CPUs) for `spec`, or None for no pinning.

    auto: the last `threads` CPUs this process may use go to the engine when at least one is left over,
    else None (too few CPUs to set any aside). A list must be CPUs this process may use, at least `threads`
    of them, and leave at least one for the HTTP side."""
    spec = spec.strip()
    if spec in ("", "off"):
        return None
    if available is None:
        if not hasattr(os, "sched_getaffinity"):
            raise ConfigError(
                f"serve settings: engine_cpus {spec!r}: CPU affinity needs Linux; leave it off here"
            )
        available = set(os.sched_getaffinity(0))
    available = set(available)
    if spec == "auto":
        if len(available) <= threads:
            return None
        ordered = sorted(available)
        engine = set(ordered[-threads:])
        return engine, available - engine
    engine = parse_cpu_list(spec)
    shown = ",".join(map(str, sorted(available)))
    missing = sorted(engine - available)
    if missing:
        raise ConfigError(
            f"serve settings: engine_cpus {spec!r}: CPU {missing[0]} is not one this process may use ({shown})"
        )
    if len(engine) < threads:
        raise ConfigError(
            f"serve settings: engine_cpus {spec!r} gives {len(engine)} CPU(s) to the engine, but threads is "
            f"{threads}: give it at least as many CPUs as threads"
        )
    if engine >= available:
        raise ConfigError(
            f"serve settings: engine_cpus {spec!r} takes every CPU this process may use ({shown}): leave one "
            "for the HTTP side, or set it to '' (off)"
        )
    return engine, available - engine


def pin_current_thread(cpus: set[int]) -> None:
    """Linux: the calling thread only (threads it starts afterwards inherit the mask)."""
    os.sched_setaffinity(0, cpus)

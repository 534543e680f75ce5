"""Batch-16 decode step by batch shape and by what the other core does: the served graph against the GQA design.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/decode_shapes.py [--checkpoint runs/demo/checkpoint]

1. Ragged rows. Continuous batching runs rows at different positions. The served graph is whatever the
   bundle's export chose: with the SlotAttention op (the default) every row attends over its own length, read in
   place; the gather graph (`--attention gather`) attends every row over the longest row's past.
   onnxruntime's GroupQueryAttention (bench/export.py's prototype, in place over the slot buffer) follows each
   row's own length too. Timed: all rows at the mean position,
   rows spread evenly from LO to HI, all rows at HI (median of interleaved rounds, each step re-decoding the same
   positions: a step's cost depends on its positions only).
2. The other core. The served decode step with this process on CPU 0 while a second process on CPU 1 idles,
   spins in pure Python, or sums an array that fits the L2 (800 KB) or does not fit beside the weights in the L3
   (16 MB): the step is bound by memory, so compute beside it is free and memory traffic is not.
Wall-clock medians (ms per step); the machine line says how loaded it was.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _bench_module(name: str):
    """bench/NAME.py by path (bench/export.py would shadow the `export` package on sys.path)."""
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", Path(__file__).resolve().parent / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bs = _bench_module("serve")  # the machine line; it also puts the repository first on sys.path
bench_export = _bench_module("export")  # the GQA prototype

LOADS = {
    "idle": None,
    "spin (pure Python)": "x = 0\nwhile True:\n    x += 1",
    "sum 800 KB (L2)": "import numpy as np\na = np.ones(200_000, np.float32)\nwhile True:\n    a.sum()",
    "sum 16 MB (L3)": "import numpy as np\na = np.ones(4_000_000, np.float32)\nwhile True:\n    a.sum()",
}


def step_ms(fn, calls: int = 12) -> float:
    times = []
    for _ in range(calls + 2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]) * 1e3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=bs.ROOT / "runs/demo/checkpoint")
    ap.add_argument("--bundle", type=Path, default=bs.ROOT / "runs/demo/bundle")
    ap.add_argument("--lo", type=int, default=20)
    ap.add_argument("--hi", type=int, default=84)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    if not (args.bundle / "model.onnx").is_file() or not (args.checkpoint / "model.safetensors").is_file():
        ap.error("needs the demo checkpoint and bundle (make demo), or --checkpoint/--bundle")
    print(f"machine: {bs.machine()}\ncommand: OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/decode_shapes.py "
          + " ".join(sys.argv[1:]) + "\n", flush=True)  # fmt: skip
    import torch

    from export.runtime import OnnxRunner
    from model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    b = 16
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    model = load_checkpoint(args.checkpoint).eval()
    served = OnnxRunner(args.bundle, b, 1024, threads=1)
    gqa = bench_export.GQAPrototype(model, Path(tempfile.mkdtemp()), 1, 1024, b)
    hi = args.hi + 1
    rows = np.random.default_rng(0).integers(3, model.config.vocab_size, (b, hi)).tolist()
    served.prefill(rows, list(range(b)), [0] * b)
    gqa.prefill(rows)
    tokens = np.full(b, 3)
    mean = (args.lo + args.hi) // 2
    shapes = {
        f"all at {mean}": np.full(b, mean),
        f"spread {args.lo}-{args.hi}": np.linspace(args.lo, args.hi, b).astype(np.int64),
        f"all at {args.hi}": np.full(b, args.hi),
    }

    def run_served(pos):
        served.lengths[:] = hi  # every position below hi is written: any row may re-decode any of them
        served.decode(tokens, np.arange(b), pos)

    res: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for shape, pos in shapes.items():
            res.setdefault(("served graph", shape), []).append(step_ms(lambda pos=pos: run_served(pos)))
            res.setdefault(("GQA prototype", shape), []).append(
                step_ms(lambda pos=pos: gqa.decode(tokens, pos))
            )
    print(f"1. batch-16 decode step by row positions, ms (median of {args.rounds} rounds):")
    print("| graph | " + " | ".join(shapes) + " |\n|---|" + "---:|" * len(shapes))
    for name in ("served graph", "GQA prototype"):
        print(f"| {name} | " + " | ".join(f"{np.median(res[(name, s)]):.2f}" for s in shapes) + " |")

    if len(cpus) < 2:
        print("\n2. skipped: one CPU")
        return 0
    pos = shapes[f"all at {mean}"]
    loads: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, code in LOADS.items():
            proc = None
            if code:
                pin = f"import os\nos.sched_setaffinity(0, {{{cpus[1]}}})\n"
                proc = subprocess.Popen([sys.executable, "-c", pin + code])
                time.sleep(0.3)
            try:
                loads.setdefault(name, []).append(step_ms(lambda: run_served(pos), calls=30))
            finally:
                if proc:
                    proc.kill()
                    proc.wait()
    print(
        f"\n2. served batch-16 decode step at position {mean} on CPU {cpus[0]}, CPU {cpus[1]} doing ..., ms:"
    )
    print("| " + " | ".join(LOADS) + " |\n|" + "---:|" * len(LOADS))
    print("| " + " | ".join(f"{np.median(loads[k]):.2f}" for k in LOADS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Two servers interleaved sweep by sweep: the A/B behind the serving changes in docs/BENCHMARKS.md.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/serve_ab.py \
        --server before=c1cb7d6 --server after=. [--concurrency 16] [--repeat 12]
    ... --server off=. --server pinned=.:auto          # the same code, engine_cpus off / auto

Each `--server NAME=REV[:ENGINE_CPUS]` runs `instructlm serve` from that git revision (a temporary worktree; `.`
is this checkout as it is) on the same bundle. Both start before the first sweep and take turns: for each
sweep, each server in order gets the same requests as bench/serve.py at one concurrency, between two
measurements of the bare runner (this checkout's) at the matching batch. A turn-by-turn comparison cancels most
of the drift a shared machine adds between two separate runs. Printed per server: served / bare tokens/s
(concurrency 16) or ITL p50 / bare step (concurrency 1), median [min-max] over sweeps, and the per-step profile.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bs  # noqa: E402  (bench/serve.py: servers, load generator, bare runner)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--server", action="append", required=True, help="NAME=REV[:ENGINE_CPUS]; REV '.' = this tree"
    )
    ap.add_argument("--model", type=Path, default=bs.ROOT / "runs/demo/bundle")
    ap.add_argument("--concurrency", type=int, default=16, choices=[1, 16])
    ap.add_argument("--repeat", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    if len(args.server) < 2:
        ap.error("give at least two --server")
    if not (args.model / "model.onnx").is_file():
        ap.error(f"--model {args.model}: no model.onnx (run `make demo`)")
    command = "PYTHONPATH=. .venv/bin/python bench/serve_ab.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    print(f"machine: {bs.machine()}\ncommand: {command}\n", flush=True)

    from model.chat import encode_chat
    from model.tokenizer import Tokenizer

    tok = Tokenizer.load(args.model)
    prompt_ids = [encode_chat(tok, [{"role": "user", "content": p}], True).ids for p in bs.PROMPTS]
    bare = bs.Bare(args.model, 1, prompt_ids)
    c, n = args.concurrency, 8 * args.concurrency
    tmp = Path(tempfile.mkdtemp(prefix="serve-ab-"))
    worktrees, servers = [], {}
    try:
        for spec in args.server:
            name, _, rest = spec.partition("=")
            rev, _, cpus = rest.partition(":")
            root = bs.ROOT
            if rev != ".":
                root = tmp / name
                subprocess.run(
                    ["git", "-C", str(bs.ROOT), "worktree", "add", "--detach", str(root), rev], check=True
                )
                worktrees.append(root)
            proc, url, _ = bs.start_server(args.model, 1, 16, cpus or None, root=root)
            servers[name] = (proc, url)
        for _, url in servers.values():  # warm-up round, unmeasured
            asyncio.run(bs.load(url, c, c, args.max_tokens))
        ratios: dict[str, list[float]] = {k: [] for k in servers}
        prof: dict[str, dict[str, float]] = {k: {} for k in servers}
        for rep in range(args.repeat):
            for name, (_, url) in servers.items():
                pre = bare.measure(c, args.max_tokens - 1)
                before = bs.scrape_profile(url)
                results, wall = asyncio.run(bs.load(url, c, n, args.max_tokens))
                after = bs.scrape_profile(url)
                post = bare.measure(c, args.max_tokens - 1)
                for k in after:
                    prof[name][k] = prof[name].get(k, 0) + after[k] - before.get(k, 0)
                st = bs.summarize(results, wall)
                if c == 16:
                    ratios[name].append(st["out_tok_s"] / ((pre[1] + post[1]) / 2))
                else:
                    ratios[name].append(st["itl_p50_ms"] / ((pre[0] + post[0]) / 2 * 1000))
                print(f"sweep {rep} {name:10s} {ratios[name][-1]:.3f}", flush=True)
    finally:
        for proc, _ in servers.values():
            bs.stop(proc)
        for root in worktrees:
            subprocess.run(
                ["git", "-C", str(bs.ROOT), "worktree", "remove", "--force", str(root)], check=False
            )
    what = "served / bare batch-16 tokens/s" if c == 16 else "ITL p50 / bare batch-1 step"
    print(f"\n{what}, concurrency {c}, {args.repeat} sweeps each, median [min-max]; profile ms per step:")
    for name, xs in ratios.items():
        p = prof[name]
        steps = max(p.get("steps", 0), 1)
        phases = "  ".join(
            f"{ph} {p.get(ph, 0) / steps * 1000:.3f}"
            for ph in ("schedule", "prefill", "decode", "update", "output")  # output: revisions that had it
        )
        print(f"  {name:10s} {statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]  {phases}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

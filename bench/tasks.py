"""Task endpoints: intent scoring with a shared prompt prefix vs full rows, and BM25 vs hybrid retrieval.

    OMP_NUM_THREADS=1 .venv/bin/python bench/tasks.py --checkpoint runs/demo/checkpoint [--encoder runs/encoder]

Intent: for each held-out utterance, the 14 label log-likelihoods by (a) the baseline, one prefill of the 14
full rows (prompt + label) with every position's logits, and (b) what the service does
(`service.tasks.customer_service.runner_scorer`): the prompt prefilled once, its cache copied into the other
slots, one batched prefill of the label tokens. Both on the same torch runner, 1 thread; the scores must agree
(max difference printed). Retrieval: milliseconds per query over the seed FAQ paraphrases.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--utterances", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import json

    from model.tokenizer import Tokenizer
    from service.runners.base import open_runner
    from service.tasks.calibration import continuation_logprob
    from service.tasks.customer_service import (
        IntentClassifier,
        load_intent_labels,
        load_utterances,
        runner_scorer,
    )
    from service.tasks.retrieval import KnowledgeBase

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")  # fmt: skip
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    seed = ROOT / "data" / "seed"
    labels = load_intent_labels(seed / "intent_labels.jsonl")
    tok = Tokenizer.load(args.checkpoint)
    runner = open_runner(args.checkpoint, "torch", num_slots=len(labels), threads=args.threads)
    clf = IntentClassifier(tok, labels)
    slots = list(range(len(labels)))
    utts = load_utterances(seed / "intents.jsonl", "test")[: args.utterances]

    def full_rows(rows, prompt_len):
        logits = runner.prefill(rows, slots[: len(rows)], [0] * len(rows), all_logits=True)
        for s in slots:
            runner.release(s)
        return np.array([continuation_logprob(lg, r, prompt_len) for lg, r in zip(logits, rows, strict=True)])

    shared = runner_scorer(runner, slots)
    clf.classify(utts[0].text, shared)  # warm-up
    times = {"full rows (baseline)": 0.0, "shared prefix (service)": 0.0}
    diff = 0.0
    tokens = []
    for u in utts:
        rows, p = clf.rows(u.text)
        tokens.append((sum(len(r) for r in rows), p + sum(len(r) - p for r in rows)))
        t0 = time.perf_counter()
        a = full_rows(rows, p)
        t1 = time.perf_counter()
        b = shared(rows, p)
        t2 = time.perf_counter()
        times["full rows (baseline)"] += t1 - t0
        times["shared prefix (service)"] += t2 - t1
        diff = max(diff, float(np.abs(a - b).max()))
    n = len(utts)
    base = times["full rows (baseline)"]
    print(f"\nintent scoring, {n} utterances x {len(labels)} labels, mean tokens computed per utterance: "
          f"{np.mean([t[0] for t in tokens]):.0f} (full) vs {np.mean([t[1] for t in tokens]):.0f} (shared)")  # fmt: skip
    print("| method | ms / utterance | speed-up |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1000 * t / n:.1f} | {base / t:.2f}x |")
    print(f"max |score difference| = {diff:.2e}")

    faq = [json.loads(line) for line in (seed / "faq.jsonl").read_text().splitlines() if line]
    queries = [p for r in faq for p in r["paraphrases"]]
    kbs = {"BM25 (baseline)": KnowledgeBase.load(seed / "faq.jsonl")}
    if args.encoder:
        from service.tasks.encoder import SentenceEncoder

        kbs["hybrid (encoder, onnxruntime)"] = KnowledgeBase.load(
            seed / "faq.jsonl", SentenceEncoder(args.encoder)
        )
    print(
        f"\nretrieval, {len(queries)} queries over {len(faq)} entries\n| method | ms / query | ratio |\n|---|---|---|"
    )
    base = None
    for name, kb in kbs.items():
        kb.search(queries[0])
        t0 = time.perf_counter()
        for q in queries:
            kb.search(q, k=3)
        ms = 1000 * (time.perf_counter() - t0) / len(queries)
        base = base or ms
        print(f"| {name} | {ms:.2f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()

"""`instructlm eval --checkpoint DIR --dataset DIR`: perplexity and generation metrics per task, into eval.md,
eval.json and PNG plots (training/evaluate.py is the harness)."""

from __future__ import annotations

import argparse


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset split (perplexity, BLEU, ROUGE, ...)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (HF Llama layout)")
    p.add_argument("--dataset", required=True, help="dataset directory (from `instructlm data build`)")
    p.add_argument(
        "--split", default="test", help="split file to evaluate: train, val or test (default test)"
    )
    p.add_argument("--task", type=_csv, default=None, help="only these record tasks, comma-separated")
    p.add_argument(
        "--metrics",
        type=_csv,
        default=None,
        help="evaluators to run, comma-separated (default: all registered)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--out", default=None, help="report directory (default: CHECKPOINT/../eval)")
    p.add_argument("--limit", type=int, default=None, help="at most N records per task")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per answer (default 64)")
    p.add_argument("--window", type=int, default=None, help="perplexity window (default: the context)")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: window/2)")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch size (default 8)")
    p.add_argument("--no-generate", action="store_true", help="perplexity only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 1)")
    p.add_argument(
        "--tasks",
        action="store_true",
        help="also evaluate the task endpoints (intent, retrieval, translation, content) against their "
        "baselines on the seed data, into the same report (service/tasks/evaluate.py)",
    )
    p.add_argument("--seed-dir", default="data/seed", help="seed data for --tasks (default data/seed)")
    p.add_argument(
        "--encoder", default=None, help="with --tasks: also hybrid retrieval with this encoder dir"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import torch

    from training.evaluate import EvalOptions, markdown_table, run_eval

    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
    options = EvalOptions(
        split=args.split,
        tasks=args.task,
        metrics=args.metrics,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        window=args.window,
        stride=args.stride,
        generate=not args.no_generate,
        batch_size=args.batch_size,
    )
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "eval"
    result = run_eval(args.checkpoint, args.dataset, out, options, tokenizer_dir=args.tokenizer)
    print(markdown_table(result.per_task))
    print(f"overall perplexity {result.overall['ppl']:.3f} over {result.overall['tokens']} tokens")
    for key, sig in sorted(result.info.get("signatures", {}).items()):
        print(f"{key}: {sig}")
    if args.tasks:
        _task_eval(args, out)
    print(f"wrote {out / 'eval.md'}, {out / 'eval.json'} and plots")
    return 0


def _task_eval(args: argparse.Namespace, out) -> None:
    """The task endpoints' evaluation (service code, reached only through the CLI), appended to the report."""
    import json

    from service.tasks.evaluate import run_task_eval
    from training.evaluate import bleu_chrf, rouge

    res = run_task_eval(
        args.checkpoint,
        args.seed_dir,
        out,
        bleu_chrf=bleu_chrf,
        rouge=rouge,
        limit=args.limit,
        threads=args.threads or 1,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        encoder=args.encoder,
    )
    md = (out / "tasks.md").read_text(encoding="utf-8")
    with open(out / "eval.md", "a", encoding="utf-8") as f:
        f.write("\n" + md)
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    report["tasks"] = res
    (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(md)

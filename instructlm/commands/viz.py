"""`instructlm viz attention|attribution`: PNG heatmaps of attention per layer and head, and a gradient x input
map of which prompt tokens drove an answer (training/viz.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "viz", help="look inside a model: attention heatmaps, gradient x input attribution"
    )
    verbs = parser.add_subparsers(dest="viz_command", metavar="VERB")
    verbs.required = True

    att = verbs.add_parser("attention", help="attention heatmaps per layer and head (tokens on the axes)")
    att.add_argument("--checkpoint", required=True, help="checkpoint directory")
    att.add_argument("--text", required=True, help="the text to run through the model")
    att.add_argument("--chat", action="store_true", help="wrap the text as a user turn in the chat format")
    att.add_argument("--out", default="runs/viz", help="output directory (default runs/viz)")
    att.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    att.add_argument(
        "--max-tokens", type=int, default=96, help="refuse longer texts (labels stop being legible)"
    )
    att.set_defaults(func=run_attention)

    attr = verbs.add_parser("attribution", help="gradient x input saliency of prompt tokens for an answer")
    attr.add_argument("--checkpoint", required=True, help="checkpoint directory")
    attr.add_argument("--prompt", required=True, help="the user's prompt")
    attr.add_argument(
        "--answer", default=None, help="answer to attribute (default: the model's greedy answer)"
    )
    attr.add_argument(
        "--max-new-tokens", type=int, default=24, help="answer length when generating (default 24)"
    )
    attr.add_argument("--raw", action="store_true", help="plain text prompt instead of a chat user turn")
    attr.add_argument("--out", default="runs/viz", help="output directory (default runs/viz)")
    attr.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    attr.add_argument("--max-tokens", type=int, default=96, help="refuse longer prompts or answers")
    attr.set_defaults(func=run_attribution)


def _threads() -> None:
    import os

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def run_attention(args: argparse.Namespace) -> int:
    from training.viz import run_attention as run

    _threads()
    paths = run(args.checkpoint, args.text, args.out, args.chat, args.tokenizer, args.max_tokens)
    print(f"wrote {len(paths)} heatmaps: {', '.join(str(p) for p in paths)}")
    return 0


def run_attribution(args: argparse.Namespace) -> int:
    from training.viz import run_attribution as run

    _threads()
    path, answer = run(
        args.checkpoint,
        args.prompt,
        args.out,
        args.answer,
        args.max_new_tokens,
        not args.raw,
        args.tokenizer,
        args.max_tokens,
    )
    print(f"answer: {answer!r}")
    print(f"wrote {path}")
    return 0

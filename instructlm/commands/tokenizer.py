"""`instructlm tokenizer train --dataset DIR --vocab-size N --out DIR`: byte-level BPE over a dataset's train split,
with the chat special tokens and template, in the layout `transformers.AutoTokenizer` loads."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tokenizer", help="train a tokenizer")
    verbs = parser.add_subparsers(dest="tokenizer_command", metavar="VERB")
    verbs.required = True
    t = verbs.add_parser("train", help="train a byte-level BPE tokenizer on a dataset's train split")
    t.add_argument("--dataset", required=True, help="dataset directory (manifest.json + train.jsonl)")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size including 3 special tokens")
    t.add_argument("--min-frequency", type=int, default=2, help="a merge needs a pair seen this often")
    t.add_argument("--model-max-length", type=int, default=1024, help="written to tokenizer_config.json")
    t.add_argument("--out", required=True, help="output directory")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from training.tokenizer_cli import train_from_dataset

    info = train_from_dataset(
        args.dataset, args.vocab_size, args.out, args.min_frequency, args.model_max_length
    )
    print(
        f"tokenizer: {info['vocab_size']} tokens from {info['records']} records "
        f"({info['chars']:,} characters, {info['tokens']:,} tokens, {info['chars_per_token']:.2f} chars/token) "
        f"-> {args.out}"
    )
    return 0

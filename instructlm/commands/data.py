"""`instructlm data build`: turn the sources a recipe names into a checked dataset directory."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="build and inspect instruction datasets")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True
    build = sub.add_parser(
        "build",
        help="read, normalize, validate, filter, dedup, label, split, augment and balance a dataset",
        description="Build a dataset directory (train/val/test JSONL, rejected.jsonl, duplicates.jsonl, "
        "manifest.json, report.md) from a data recipe. Flags override the recipe.",
    )
    build.add_argument("--config", required=True, help="data recipe, e.g. configs/data/demo.toml")
    build.add_argument("--out", required=True, help="output directory (replaced atomically)")
    build.add_argument("--workers", type=int, default=None, help="processes for the per-record stages")
    build.add_argument("--seed", type=int, default=None, help="split / augmentation seed")
    build.add_argument("--name", default=None, help="dataset name written to the manifest")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from training.data.config import load_config
    from training.data.pipeline import build

    overrides = {"workers": args.workers, "seed": args.seed, "name": args.name}
    cfg = load_config(args.config, overrides)
    manifest = build(cfg, args.out, config_path=args.config, progress=not args.no_progress)
    c = manifest["counts"]
    print(
        f"{args.out}: {c['inputs']} inputs → {c['kept']} kept, {c['rejected']} rejected, "
        f"{c['duplicates']} duplicates, {c['derived']} derived; splits {c['by_split']}"
    )
    return 0

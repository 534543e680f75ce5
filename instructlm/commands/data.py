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
    si = sub.add_parser(
        "self-instruct",
        help="generate new instructions and answers from the seed tasks through an OpenAI-compatible endpoint",
        description="Self-Instruct: ask an OpenAI-compatible chat endpoint (ours or another) for new tasks like "
        "the seed ones and their answers, write OUT/generated.jsonl, and build OUT/dataset from it with the "
        "pipeline's filters and dedup (against the seed data, or the sources of --config).",
    )
    si.add_argument("--endpoint", required=True, help="base URL of the API, e.g. http://127.0.0.1:8000/v1")
    si.add_argument("--model", default="", help="model name to send (default: the first of GET /models)")
    si.add_argument("--out", required=True, help="output directory (generated.jsonl and dataset/)")
    si.add_argument("--num", type=int, default=50, help="instructions to generate (default 50)")
    si.add_argument("--examples", type=int, default=4, help="in-context examples per request (default 4)")
    si.add_argument("--seed-dir", default="data/seed", help="seed data (default data/seed)")
    si.add_argument(
        "--config", default=None, help="data recipe whose sources the new data is deduplicated against"
    )
    si.add_argument("--temperature", type=float, default=0.7)
    si.add_argument("--max-tokens", type=int, default=256)
    si.add_argument("--seed", type=int, default=0)
    si.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key"
    )
    si.add_argument("--no-progress", action="store_true", help="no progress bar")
    si.set_defaults(func=run_self_instruct)


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


def run_self_instruct(args: argparse.Namespace) -> int:
    import json
    import os
    import urllib.request

    from training.data.self_instruct import EndpointError, run

    model = args.model
    if not model:
        url = args.endpoint.rstrip("/") + "/models"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                model = json.loads(resp.read())["data"][0]["id"]
        except Exception as exc:  # any failure here means: name the model yourself
            raise EndpointError(f"{url}: cannot list the models ({exc}); pass --model") from None
    manifest = run(
        args.endpoint,
        model,
        args.out,
        args.num,
        seed_dir=args.seed_dir,
        config=args.config,
        progress=not args.no_progress,
        examples=args.examples,
        seed=args.seed,
        api_key=os.environ.get(args.api_key_env, ""),
        temperature=args.temperature,
        max_tokens=args.max_tokens,
    )
    c = manifest["counts"]["by_source"]["self_instruct"]
    print(
        f"{args.out}: {c['inputs']} generated → {c['kept']} kept, {c['rejected']} rejected, "
        f"{c['duplicates']} duplicates (dataset in {args.out}/dataset, reasons in rejected.jsonl)"
    )
    return 0

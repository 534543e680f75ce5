"""`instructlm train --config configs/train/demo.toml`: pretrain and/or SFT, resuming from the last checkpoint.

Under `torchrun --nproc_per_node=N` the same command trains with DDP (or FSDP2 with run.distributed = "fsdp").
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train the model (stages pretrain, sft) from a TOML recipe")
    parser.add_argument("--config", required=True, help="training recipe, e.g. configs/train/demo.toml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, TOML value), e.g. --set sft.steps=50 --set out_dir='\"runs/x\"'",
    )
    parser.add_argument("--fresh", action="store_true", help="discard this run's checkpoints and start over")
    parser.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict:
    import tomllib

    from model.errors import ConfigError

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string: --set out_dir=runs/x
        out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from training.train import load_config, train

    cfg = load_config(args.config, parse_overrides(args.set))
    report = train(cfg, fresh=args.fresh)
    if report is None or int(os.environ.get("RANK", "0")) != 0:
        return 0
    for s in report["stages"]:
        base = s.get("unigram_val_loss")
        extra = f" (unigram baseline {base:.4f})" if base is not None else ""
        steps = s.get("steps_done", s["steps"])
        took = f" in {s['seconds']:.0f} s" if "seconds" in s else ""
        print(f"{s['stage']}: validation loss {s['val_loss']:.4f}{extra} after {steps} steps{took}")
    for sample in report.get("samples", []):
        print(f"[{sample['task']}] {sample['prompt'][:80]!r} -> {sample['generated'][:160]!r}")
    print(f"checkpoint: {report.get('checkpoint')}")
    return 0

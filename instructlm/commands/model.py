"""`instructlm model info PATH`: a checkpoint's config, parameter count, dtypes and size (weights not loaded)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("model", help="inspect model checkpoints")
    verbs = parser.add_subparsers(dest="model_command", metavar="VERB")
    verbs.required = True
    info = verbs.add_parser("info", help="config, parameter count, dtypes and size of a checkpoint")
    info.add_argument("path", help="checkpoint directory (HF Llama layout)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    import json

    from model.checkpoint import checkpoint_info

    info = checkpoint_info(args.path)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    cfg = info["config"]
    rows = [
        ("path", info["path"]),
        ("architecture", ", ".join(cfg.get("architectures", []))),
        ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.2f}M)"),
        ("dtypes", ", ".join(f"{k}: {v:,}" for k, v in info["dtypes"].items())),
        ("size", f"{info['size_bytes'] / 2**20:.2f} MiB"),
        ("tokenizer", "yes" if info["has_tokenizer"] else "no"),
    ]
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        rows.append((key, str(cfg.get(key))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0

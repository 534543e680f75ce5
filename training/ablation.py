"""The data ablation: does cleaning the instruction data help? (`make ablation`)

Trains the demo recipe twice with the same budget (same model, tokenizer, steps, batch and sequence length, so
the same number of tokens): once on the built dataset, once on the raw sources (the same readers with filters,
dedup, augmentation and balancing switched off), and evaluates both checkpoints on the built dataset's test
split with the one harness (training/evaluate.py). The raw run never trains on the held-out records: every record
of the built val/test splits is removed from its training data by id, and so is any record whose prompt is
character-for-character the same as a held-out prompt after case and whitespace folding (without dedup the raw
sources repeat some). Near-duplicates of held-out prompts are NOT removed from the raw run: that leakage is part
of what cleaning prevents, and it flatters the raw numbers, not the clean ones.

Writes docs/EVALUATION.md (both side by side, with the command, machine and timings) and docs/ablation.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import msgspec

from model.errors import ConfigError

DEFAULT_CONFIG = "configs/train/ablation.toml"
# `make ablation` rewrites docs/EVALUATION.md up to this line and keeps everything from it on.
KEEP_MARKER = "<!-- Sections below are kept when make ablation rewrites the report above. -->"

# Lower is better for these; every other reported metric is higher-is-better.
LOWER_IS_BETTER = {"ppl", "repetition_4", "self_bleu", "empty"}
REPORTED = [
    "ppl",
    "bleu",
    "chrf",
    "rouge1",
    "rouge2",
    "rougeL",
    "distinct_1",
    "distinct_2",
    "repetition_4",
    "self_bleu",
    "stopped",
    "empty",
]


def _raw_overrides() -> dict[str, Any]:
    # Every cleaning stage of the data recipe off: no quality filters (thresholds at their permissive ends),
    # no exact/near dedup, no augmentation, no balancing (examples-proportional mixing, no per-task cap).
    return {
        "dedup.exact": False,
        "dedup.near": False,
        "filter.max_char_rep": 1.0,
        "filter.max_word_rep": 1.0,
        "filter.max_special_ratio": 1.0,
        "filter.min_alnum_ratio": 0.0,
        "filter.max_restate": 1.0,
        "augment.rephrase": False,
        "augment.flip_translation": False,
        "augment.alpaca_variants": False,
        "balance.cap": 0,
        "balance.temperature": 1.0,
        "balance.max_per_task": 0,
    }


class RawSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Dotted data-recipe keys applied to the raw build (the data recipe's own names; a wrong one is an error).
    overrides: dict[str, Any] = msgspec.field(default_factory=_raw_overrides)
    # The per-source Self-Instruct instruction dedup is a list item, not a dotted key: switched off here.
    instruction_dedup: bool = False


class EvalSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_new_tokens: int = 48
    limit: int = 0  # records per task (0 = the whole test split)
    batch_size: int = 8


class AblationConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Paths are relative to the working directory (the repository root under `make`), as the demo recipes are.
    out_dir: str = "runs/ablation"
    data_recipe: str = "configs/data/demo.toml"
    train_recipe: str = "configs/train/demo.toml"
    report: str = "docs/EVALUATION.md"
    # Reuse an already built dataset / tokenizer (e.g. runs/demo/...) instead of building them again.
    clean_dataset: str = ""
    tokenizer: str = ""
    raw_dataset: str = ""  # a raw dataset a previous ablation assembled (its manifest holds the counts)
    tokenizer_vocab: int = 8192  # the demo preset's vocabulary
    tokenizer_min_frequency: int = 2
    # Dotted train-recipe keys for both runs (e.g. fewer steps for a quick look); both runs get the same.
    train_overrides: dict[str, Any] = {}
    raw: RawSection = msgspec.field(default_factory=RawSection)
    eval: EvalSection = msgspec.field(default_factory=EvalSection)


def load_config(path: str | Path) -> AblationConfig:
    from model.toml_config import load

    return load(path, AblationConfig)


# --- the raw training set ------------------------------------------------------------------------------------
def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _prompt_key(rec: dict[str, Any]) -> str:
    if rec.get("kind") == "text":
        return _fold(rec.get("text") or "")
    return _fold("\n".join(m["content"] for m in rec.get("messages") or () if m.get("role") == "user"))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def assemble_raw(raw_build: str | Path, clean: str | Path, out: str | Path) -> dict[str, Any]:
    """The raw run's dataset: every record the raw build kept (all of its splits) minus the clean held-out
    records (by id and by folded prompt), with the clean val/test splits beside it and examples-proportional
    mixing weights. Returns the counts for the report."""
    from training.data.mixing import mixing_weights

    raw_build, clean, out = Path(raw_build), Path(clean), Path(out)
    held = _read_jsonl(clean / "val.jsonl") + _read_jsonl(clean / "test.jsonl")
    if not _read_jsonl(clean / "test.jsonl"):
        raise ConfigError(f"{clean}: the built dataset has no test split to evaluate on")
    held_ids = {r["id"] for r in held}
    held_prompts = {_prompt_key(r) for r in held}
    pool = [r for split in ("train", "val", "test") for r in _read_jsonl(raw_build / f"{split}.jsonl")]
    kept, by_id, by_prompt = [], 0, 0
    for rec in pool:
        if rec["id"] in held_ids:
            by_id += 1
        elif _prompt_key(rec) in held_prompts:
            by_prompt += 1
        else:
            rec.get("meta", {}).pop("split", None)
            kept.append(rec)
    if not kept:
        raise ConfigError(f"{raw_build}: nothing left to train on after removing the held-out records")
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", kept)
    for split in ("val", "test"):
        (out / f"{split}.jsonl").write_bytes((clean / f"{split}.jsonl").read_bytes())
    for name in ("rejected.jsonl", "duplicates.jsonl"):
        (out / name).write_text("")
    counts: dict[str, int] = {}
    for rec in kept:
        counts[rec["task"]] = counts.get(rec["task"], 0) + 1
    manifest = {
        "name": "raw",
        "counts": {
            "train": len(kept),
            "val": len(_read_jsonl(out / "val.jsonl")),
            "test": len(_read_jsonl(out / "test.jsonl")),
        },
        "mixing": {"weights": mixing_weights(counts, cap=0, temperature=1.0), "cap": 0, "temperature": 1.0},
        "ablation": {"pool": len(pool), "removed_held_out_id": by_id, "removed_held_out_prompt": by_prompt},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {
        "pool": len(pool),
        "train": len(kept),
        "removed_id": by_id,
        "removed_prompt": by_prompt,
        "tasks": counts,
    }


# --- report --------------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
    return str(value)


def comparison_rows(clean: dict[str, Any], raw: dict[str, Any]) -> list[tuple[str, str, Any, Any, str]]:
    """(task, metric, clean, raw, better) for every reported metric present in both eval.json files."""
    rows = []
    tasks = ["overall", *sorted(clean["per_task"])]
    for task in tasks:
        a = clean["overall"] if task == "overall" else clean["per_task"].get(task, {})
        b = raw["overall"] if task == "overall" else raw["per_task"].get(task, {})
        for metric in REPORTED:
            va, vb = a.get(metric), b.get(metric)
            if not isinstance(va, int | float) or not isinstance(vb, int | float):
                continue
            if va == vb:
                better = "="
            elif (va < vb) == (metric in LOWER_IS_BETTER):
                better = "clean"
            else:
                better = "raw"
            rows.append((task, metric, va, vb, better))
    return rows


def plot(rows: list[tuple[str, str, Any, Any, str]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = [(t, a, b) for t, m, a, b, _ in rows if m == "ppl"]
    gen = [(f"{t}\n{m}", a, b) for t, m, a, b, _ in rows if m in ("bleu", "chrf", "rougeL")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, items, label in (
        (axes[0], ppl, "perplexity (lower is better)"),
        (axes[1], gen, "score (higher is better)"),
    ):
        x = range(len(items))
        ax.bar([i - 0.2 for i in x], [a for _, a, _ in items], 0.4, label="built dataset")
        ax.bar([i + 0.2 for i in x], [b for _, _, b in items], 0.4, label="raw sources")
        ax.set_xticks(list(x), [t for t, _, _ in items], rotation=30, fontsize=8)
        ax.set_ylabel(label)
        ax.legend()
    if ppl:
        axes[0].set_yscale("log")
    fig.suptitle("data ablation: same model and budget, evaluated on the built test split")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(
    path: Path, facts: dict[str, Any], clean_eval: dict[str, Any], raw_eval: dict[str, Any]
) -> None:
    rows = comparison_rows(clean_eval, raw_eval)
    png = plot(rows, path.with_name("ablation.png"))
    wins = {k: sum(1 for r in rows if r[4] == k) for k in ("clean", "raw", "=")}
    ov = {m: (a, b) for t, m, a, b, _ in rows if t == "overall"}
    lines = [
        "# Evaluation: does cleaning the instruction data help?",
        "",
        "The data ablation (issue 6): the demo recipe trained twice with the same budget, once on the built "
        "dataset (filters, dedup, augmentation, balancing) and once on the raw sources (the same readers, all of "
        "that off), both evaluated on the built dataset's test split, which the raw run never trains on.",
        "",
        f"Command: `{facts['command']}` (config `{facts['config']}`), {facts['date']}.",
        f"Training budget, identical for both runs: {facts.get('budget', '')}. Evaluation: {facts.get('eval', '')}.",
        f"Machine: {facts['machine']}. Wall time: {facts['seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in facts['timings'].items())}).",
        "",
        "## Result",
        "",
    ]
    if facts.get("note"):
        lines += [facts["note"], ""]
    if "ppl" in ov:
        a, b = ov["ppl"]
        lines.append(
            f"Overall test perplexity: **{a:.2f}** trained on the built dataset vs **{b:.2f}** on the raw sources "
            f"({abs(b - a) / b * 100:.1f}% {'lower' if a <= b else 'higher'} for the built dataset; lower is better)."
        )
    lines += [
        f"Across the {len(rows)} task x metric cells below the built dataset is better in {wins['clean']}, the raw "
        f"sources in {wins['raw']}, tied in {wins['=']}.",
        "",
        "| task | metric | built dataset | raw sources | better |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {t} | {m} | {_cell(a)} | {_cell(b)} | {w} |" for t, m, a, b, w in rows]
    lines += [
        "",
        f"![ablation]({png.name})",
        "",
        "Metrics as in `instructlm eval` (training/evaluate.py): ppl is token-weighted perplexity of the answer "
        "tokens; bleu/chrf sacrebleu (zh tokenization for Chinese targets); rouge* F x100 with CJK kept; "
        "distinct_n, repetition_4 (seq-rep-4), self_bleu on the greedy answers; stopped = share of answers that "
        "ended with the end-of-turn token within the budget; empty = share of empty answers. With a model this small trained for minutes on a CPU, "
        "generation metrics are small and noisy; perplexity is the steadier signal.",
        "",
        "## Data",
        "",
        "| | built dataset | raw sources |",
        "|---|---|---|",
        f"| training records | {facts['clean_train']} | {facts['raw']['train']} |",
        f"| held-out records removed from training (by id / by identical prompt) | - | "
        f"{facts['raw']['removed_id']} / {facts['raw']['removed_prompt']} |",
        f"| training tokens seen (same budget) | {facts['clean_tokens']} | {facts['raw_tokens']} |",
        f"| final validation loss (built val split) | {_cell(facts['clean_val'])} | {_cell(facts['raw_val'])} |",
        "",
        f"Raw build overrides: `{json.dumps(facts['overrides'])}`; per-source instruction dedup off. Both runs "
        f"use the tokenizer `{facts['tokenizer']}` trained on the built train split, so perplexities compare.",
        "",
        "Near-duplicates of test prompts are not removed from the raw run (only exact repeats are): that "
        "leakage is what the built dataset's cluster-aware split prevents, and it can only flatter the raw "
        "numbers.",
        "",
        "Per-run reports: `runs/ablation/{clean,raw}/eval/eval.md`.",
        "",
        "## Evaluating any checkpoint",
        "",
        "```",
        "instructlm eval --checkpoint runs/demo/checkpoint --dataset runs/demo/dataset [--task translation]",
        "instructlm viz attention --checkpoint runs/demo/checkpoint --text 'How do I reset my password?' --chat",
        "instructlm viz attribution --checkpoint runs/demo/checkpoint --prompt 'How do I reset my password?'",
        "```",
        "",
        "`eval` writes eval.md, eval.json and PNG plots (default: beside the checkpoint, in `eval/`) and prints "
        "the sacrebleu signatures; the formulas are in [theory.md](theory.md).",
        "",
    ]
    # Sections after the marker (the task evaluation of `instructlm eval --tasks`) belong to other commands.
    kept = ""
    if path.is_file():
        previous = path.read_text(encoding="utf-8")
        if KEEP_MARKER in previous:
            kept = previous[previous.index(KEEP_MARKER) :]
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""), encoding="utf-8")


# --- the run -------------------------------------------------------------------------------------------------
def _tokens_seen(run_dir: Path) -> tuple[int, float | None]:
    report = run_dir / "eval" / "train_report.json"
    if not report.is_file():
        return 0, None
    stages = json.loads(report.read_text())["stages"]
    return sum(int(s.get("tokens_seen", 0)) for s in stages), stages[-1].get("val_loss")


def run(config_path: str | Path, fresh: bool = False) -> Path:
    import torch

    from training import train as TR
    from training.data.config import load_config as load_data_config
    from training.data.pipeline import build
    from training.evaluate import EvalOptions, run_eval
    from training.tokenizer_cli import train_from_dataset

    cfg = load_config(config_path)
    out = Path(cfg.out_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def phase(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        print(f"ablation: {name} done in {timings[name]:.0f} s", flush=True)

    # 1. the built dataset and the tokenizer both runs share
    t0 = time.perf_counter()
    clean = Path(cfg.clean_dataset) if cfg.clean_dataset else out / "clean" / "dataset"
    if not cfg.clean_dataset:
        build(load_data_config(cfg.data_recipe), clean, config_path=cfg.data_recipe)
    tokenizer = Path(cfg.tokenizer) if cfg.tokenizer else out / "tokenizer"
    if not cfg.tokenizer:
        train_from_dataset(clean, cfg.tokenizer_vocab, tokenizer, cfg.tokenizer_min_frequency)
    phase("built dataset + tokenizer", t0)

    # 2. the raw sources through the same readers, every cleaning stage off
    t0 = time.perf_counter()
    raw_cfg = load_data_config(cfg.data_recipe, dict(cfg.raw.overrides))
    if not cfg.raw.instruction_dedup:
        for source in raw_cfg.sources:
            source.instruction_dedup = False
    raw = Path(cfg.raw_dataset) if cfg.raw_dataset else out / "raw" / "dataset"
    if cfg.raw_dataset:
        manifest = json.loads((raw / "manifest.json").read_text())
        abl = manifest["ablation"]
        raw_counts = {
            "pool": abl["pool"],
            "train": manifest["counts"]["train"],
            "removed_id": abl["removed_held_out_id"],
            "removed_prompt": abl["removed_held_out_prompt"],
        }
    else:
        build(raw_cfg, out / "raw" / "build", config_path=cfg.data_recipe)
        raw_counts = assemble_raw(out / "raw" / "build", clean, raw)
    phase("raw dataset", t0)

    # 3. the same recipe and budget on each
    runs = {"clean": clean, "raw": raw}
    budget = []
    for name, dataset in runs.items():
        t0 = time.perf_counter()
        overrides = {
            **cfg.train_overrides,
            "out_dir": str(out / name),
            "data.dataset": str(dataset),
            "data.tokenizer": str(tokenizer),
        }
        train_cfg = TR.load_config(cfg.train_recipe, overrides)
        budget = [
            f"{st} {getattr(train_cfg, st).steps} steps x {getattr(train_cfg, st).batch_size * getattr(train_cfg, st).grad_accum}"
            f" rows x {train_cfg.data.seq_len} tokens"
            for st in train_cfg.stages
        ]
        if TR.train(train_cfg, fresh=fresh) is None:
            raise SystemExit(
                f"ablation: the {name} run was stopped by a signal; run the same command to resume"
            )
        phase(f"train {name}", t0)

    # 4. both on the built test split
    evals = {}
    for name in runs:
        t0 = time.perf_counter()
        options = EvalOptions(
            split="test",
            max_new_tokens=cfg.eval.max_new_tokens,
            limit=cfg.eval.limit or None,
            batch_size=cfg.eval.batch_size,
        )
        run_eval(out / name / "checkpoint", clean, out / name / "eval", options)
        evals[name] = json.loads((out / name / "eval" / "eval.json").read_text())
        phase(f"eval {name}", t0)

    clean_tokens, clean_val = _tokens_seen(out / "clean")
    raw_tokens, raw_val = _tokens_seen(out / "raw")
    facts = {
        "command": "make ablation"
        if Path(config_path) == Path(DEFAULT_CONFIG)
        else f"python -m training.ablation --config {config_path}",
        "budget": f"{cfg.train_recipe} with {json.dumps(cfg.train_overrides) if cfg.train_overrides else 'no overrides'}"
        f" ({'; '.join(budget)}, model {train_cfg.model.preset})",
        "eval": f"max_new_tokens {cfg.eval.max_new_tokens}, "
        f"{'first ' + str(cfg.eval.limit) + ' test records per task' if cfg.eval.limit else 'whole test split'}",
        "config": str(config_path),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}",
        "seconds": time.perf_counter() - start,
        "timings": timings,
        "clean_train": len(_read_jsonl(clean / "train.jsonl")),
        "raw": raw_counts,
        "clean_tokens": clean_tokens,
        "raw_tokens": raw_tokens,
        "clean_val": clean_val,
        "raw_val": raw_val,
        "overrides": cfg.raw.overrides,
        "tokenizer": str(tokenizer),
        "note": ""
        if set(cfg.train_overrides) <= {"pretrain.max_seconds", "sft.max_seconds"}
        else f"Note: this run changes the demo recipe ({', '.join(sorted(cfg.train_overrides))}); "
        "`make ablation` (configs/train/ablation.toml) runs the recipe's own model and steps.",
    }
    report = Path(cfg.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, facts, evals["clean"], evals["raw"])
    print(f"ablation: wrote {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    import sys

    from model.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m training.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="ablation recipe")
    parser.add_argument("--fresh", action="store_true", help="retrain both runs from scratch")
    args = parser.parse_args(argv)
    try:
        run(args.config, fresh=args.fresh)
    except UserError as exc:
        print(f"ablation: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The data recipe (configs/data/*.toml) as typed msgspec Structs; every default says why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from model.errors import ConfigError
from model.tasks import TASKS
from training.data.dedup import DedupConfig, SplitConfig
from training.data.filters import FilterConfig
from training.data.split import AugmentConfig, BalanceConfig


class SourceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    reader: str
    # Relative to the recipe's `base_dir`; empty for corpora shipped in a PyPI package (the reader finds them).
    path: str = ""
    name: str = ""  # defaults to the reader name (+ position when a reader appears twice)
    task: str = ""  # force a task for every record of this source; empty = the reader's label or the rules
    limit: int = 0  # read at most this many input units (0 = all); keeps the demo build under a minute
    encoding: str = "utf-8"
    columns: dict[str, str] = {}  # csv/tsv/parquet: our field → their column
    delimiter: str = ""  # csv/tsv: default "," or "\t" by reader / extension
    text_unit: Literal["paragraph", "line", "file"] = "paragraph"
    src_lang: str = ""  # gettext and table translation pairs; gettext reads tgt from the header if empty
    tgt_lang: str = ""
    languages: list[str] = []  # chatterbot: language directories (default ["english"])
    labels_path: str = ""  # seed_intents: intent_labels.jsonl (default: beside the intents file)
    scrub_pii: bool | None = None  # None = [normalize].pii; the seed data's public company contacts stay
    instruction_dedup: bool = False  # apply the Self-Instruct ROUGE-L rule to this source's instructions


class NormalizeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    unicode_form: Literal["NFC", "NFKC", ""] = "NFC"  # NFKC folds full-width CJK punctuation
    strip_html: bool = True
    pii: list[Literal["email", "phone", "url"]] = msgspec.field(
        default_factory=lambda: ["email", "phone", "url"]
    )


class ValidateConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_chars: int = 20_000  # per message or text; longer ones are mostly scraped pages, not instructions
    max_turns: int = 64
    check_language: bool = True


class DataConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str = "dataset"
    seed: int = 0
    base_dir: str = "."  # relative to the recipe file's directory
    workers: int = 1
    pictures: bool = (
        True  # report/*.png beside report.md (matplotlib, about 0.45 s of CPU a build); stage tests skip them
    )
    sources: list[SourceConfig] = []
    normalize: NormalizeConfig = msgspec.field(default_factory=NormalizeConfig)
    validate: ValidateConfig = msgspec.field(default_factory=ValidateConfig)
    filter: FilterConfig = msgspec.field(default_factory=FilterConfig)
    dedup: DedupConfig = msgspec.field(default_factory=DedupConfig)
    split: SplitConfig = msgspec.field(default_factory=SplitConfig)
    augment: AugmentConfig = msgspec.field(default_factory=AugmentConfig)
    balance: BalanceConfig = msgspec.field(default_factory=BalanceConfig)


@dataclass
class SourceSpec:
    """A source after resolution: what the per-record code needs, picklable for worker processes."""

    index: int
    name: str
    reader: str
    where: str  # "sources[2]" for messages
    path: Path
    display: str  # the path as the recipe names it: stable across machines, used in records
    task: str
    limit: int
    encoding: str
    columns: dict[str, str]
    delimiter: str
    text_unit: str
    src_lang: str
    tgt_lang: str
    languages: list[str]
    labels: list[str]
    pii: tuple[str, ...]
    instruction_dedup: bool
    extra_files: list[Path] = field(default_factory=list)
    base_dir: Path = Path(".")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DataConfig:
    from model.toml_config import load

    cfg = load(path, DataConfig, overrides)
    check_config(cfg, str(path))
    return cfg


def check_config(cfg: DataConfig, where: str) -> None:
    if cfg.workers < 1:
        raise ConfigError(f"{where}: workers must be >= 1, got {cfg.workers}")
    if not cfg.sources:
        raise ConfigError(f"{where}: no [[sources]]; a recipe needs at least one")
    for i, s in enumerate(cfg.sources):
        if s.task and s.task not in TASKS:
            raise ConfigError(
                f"{where}: sources[{i}].task: unknown task '{s.task}' (known: {', '.join(TASKS)})"
            )
        if s.limit < 0:
            raise ConfigError(f"{where}: sources[{i}].limit must be >= 0 (0 = all), got {s.limit}")
        try:
            "".encode(s.encoding)
        except LookupError:
            raise ConfigError(f"{where}: sources[{i}].encoding: unknown encoding '{s.encoding}'") from None
    if cfg.validate.max_chars < 1 or cfg.validate.max_turns < 1:
        raise ConfigError(f"{where}: validate.max_chars and validate.max_turns must be >= 1")
    for key, value in (
        ("dedup.near_threshold", cfg.dedup.near_threshold),
        ("dedup.instruction_rouge_l", cfg.dedup.instruction_rouge_l),
        ("dedup.instruction_candidates", cfg.dedup.instruction_candidates),
        ("split.link_char3", cfg.split.link_char3),
        ("split.link_word3", cfg.split.link_word3),
        ("split.link_rouge_l", cfg.split.link_rouge_l),
        ("augment.rephrase_fraction", cfg.augment.rephrase_fraction),
        ("filter.max_char_rep", cfg.filter.max_char_rep),
        ("filter.max_word_rep", cfg.filter.max_word_rep),
        ("filter.max_special_ratio", cfg.filter.max_special_ratio),
        ("filter.min_alnum_ratio", cfg.filter.min_alnum_ratio),
        ("filter.max_restate", cfg.filter.max_restate),
    ):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}: {key} must be between 0 and 1, got {value}")
    if (
        cfg.split.val_fraction < 0
        or cfg.split.test_fraction < 0
        or cfg.split.val_fraction + cfg.split.test_fraction >= 1
    ):
        raise ConfigError(f"{where}: split.val_fraction + split.test_fraction must be in [0, 1)")
    if cfg.dedup.ngram < 1 or cfg.filter.char_rep_n < 1 or cfg.filter.word_rep_n < 1:
        raise ConfigError(f"{where}: dedup.ngram, filter.char_rep_n and filter.word_rep_n must be >= 1")
    if cfg.dedup.num_perm < 16 or cfg.split.num_perm < 16:
        raise ConfigError(f"{where}: dedup.num_perm and split.num_perm must be >= 16")
    if cfg.balance.temperature <= 0 or cfg.balance.cap < 0 or cfg.balance.max_per_task < 0:
        raise ConfigError(
            f"{where}: balance.temperature must be > 0, balance.cap and balance.max_per_task >= 0"
        )


def resolve_sources(cfg: DataConfig, config_path: Path | None) -> list[SourceSpec]:
    from training.data.readers import get_reader, load_intent_labels, package_path

    base = (config_path.parent if config_path else Path.cwd()) / cfg.base_dir
    specs, names = [], set()
    for i, s in enumerate(cfg.sources):
        where = f"sources[{i}]"
        reader = get_reader(s.reader, where)
        if s.path:
            path = Path(s.path) if Path(s.path).is_absolute() else base / s.path
            display = s.path
        elif reader.package:
            path, display = package_path(reader)
        else:
            raise ConfigError(f"{where}.path: the {s.reader} reader needs a path")
        if not path.exists():
            raise ConfigError(f"{where}.path: {display} does not exist (resolved to {path.resolve()})")
        name = s.name or (s.reader if s.reader not in names else f"{s.reader}_{i}")
        if name in names:
            raise ConfigError(f"{where}.name: '{name}' is used by another source")
        names.add(name)
        labels: list[str] = []
        extra: list[Path] = []
        if s.reader == "seed_intents":
            labels_path = (base / s.labels_path) if s.labels_path else path.parent / "intent_labels.jsonl"
            if not labels_path.is_file():
                raise ConfigError(f"{where}.labels_path: intent labels file {labels_path} does not exist")
            labels = load_intent_labels(labels_path)
            extra.append(labels_path)
        pii = (
            tuple(cfg.normalize.pii)
            if s.scrub_pii is None
            else (tuple(cfg.normalize.pii) if s.scrub_pii else ())
        )
        specs.append(
            SourceSpec(
                index=i, name=name, reader=s.reader, where=where, path=path, display=display, task=s.task,
                limit=s.limit, encoding=s.encoding, columns=dict(s.columns), delimiter=s.delimiter,
                text_unit=s.text_unit, src_lang=s.src_lang, tgt_lang=s.tgt_lang, languages=list(s.languages),
                labels=labels, pii=pii, instruction_dedup=s.instruction_dedup, extra_files=extra, base_dir=base,
            )
        )  # fmt: skip
    return specs

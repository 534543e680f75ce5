"""The one evaluation harness: a checkpoint on a dataset split -> per-task metrics in eval.json, eval.md and PNGs.

- Perplexity, token-weighted: exp(sum of NLL / number of scored tokens) over all records of a task (not a mean of
  per-record perplexities, which would let a 3-token answer weigh as much as a 300-token one). Chat records are
  scored on the tokens the SFT loss covers (assistant content and its <|im_end|>), text records on every token
  after the first. Sequences longer than the window are scored with a sliding window: each token is scored once,
  with at least `window - stride` tokens of context once it is far enough in.
- Generation (greedy by default) through `model.generate` and `model.sampling`, prompting with the chat format
  the model was trained on; the reference is the record's last assistant turn.
- Metrics on the generations come from a registry of evaluators (`EVALUATORS`): BLEU and chrF (sacrebleu,
  `zh` tokenization for Chinese targets) for translation; ROUGE-1/2/L (rouge-score with a tokenizer that keeps
  CJK characters) for reference-answer tasks; distinct-1/2, repetition rate and self-BLEU for every generated
  text. Other parts (task endpoints: intent, retrieval) register theirs with `register_evaluator` and run in
  the same pass, into the same report.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from model.errors import CheckpointError, UserError


class EvalError(UserError):
    """Bad evaluation input: a dataset without the split or task asked for, an unknown metric."""


SPLITS = ("train", "val", "test")


# --- dataset -------------------------------------------------------------------------------------------------
def load_split(dataset_dir: str | Path, split: str = "test", tasks: Sequence[str] | None = None) -> list[Any]:
    """Records of one split (`{split}.jsonl` in a dataset dir), optionally only some tasks. Errors name the file
    and line, the split files that exist, and the tasks that the split holds."""
    from training.data.record import Record

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise EvalError(f"dataset directory not found: {dataset_dir}")
    path = dataset_dir / f"{split}.jsonl"
    if not path.is_file():
        present = sorted(p.stem for p in dataset_dir.glob("*.jsonl") if p.stem in SPLITS)
        raise EvalError(
            f"{dataset_dir}: no split '{split}' ({path.name} missing); splits present: {', '.join(present) or 'none'}"
        )
    decoder = msgspec.json.Decoder(Record)
    records = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(decoder.decode(line))
            except msgspec.DecodeError as exc:
                raise EvalError(f"{path}:{lineno}: not a dataset record ({exc})") from None
    if tasks:
        present = sorted({r.task for r in records})
        missing = [t for t in tasks if t not in present]
        if missing:
            raise EvalError(
                f"{path}: no records of task(s) {', '.join(missing)}; tasks in this split: {', '.join(present) or 'none'}"
            )
        records = [r for r in records if r.task in tasks]
    if not records:
        raise EvalError(f"{path}: the split is empty")
    return records


def check_tokenizer(tokenizer: Any, config: Any, where: str) -> None:
    """A tokenizer that does not belong to the checkpoint gives ids out of the embedding's range or stops on the
    wrong token; refuse it before scoring anything."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size}: the tokenizer does not belong to this checkpoint"
        )
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if eos_ids and tokenizer.eos_id not in eos_ids:
        raise CheckpointError(
            f"{where}: tokenizer's <|im_end|> is id {tokenizer.eos_id} but config.json eos_token_id is "
            f"{config.eos_token_id}: the tokenizer does not belong to this checkpoint"
        )


# --- perplexity ----------------------------------------------------------------------------------------------
@dataclass
class Scored:
    """ids and a 0/1 mask of the tokens whose prediction is scored (position 0 is never scored)."""

    ids: list[int]
    mask: list[int]


def scored_sequence(tokenizer: Any, record: Any) -> Scored:
    from model.chat import encode_chat

    if record.kind == "text":
        ids = tokenizer.encode(record.text or "") + [tokenizer.endoftext_id]
        return Scored(ids, [0] + [1] * (len(ids) - 1))
    messages = [{"role": m.role, "content": m.content} for m in record.messages or ()]
    enc = encode_chat(tokenizer, messages)
    return Scored(enc.ids, [0, *enc.loss_mask[1:]])


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) per window: every index 1..length-1 is scored exactly once, predicted
    from the window it first falls into after the previous window's end."""
    if window < 2:
        raise ValueError(f"window must be at least 2, got {window}")
    if not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be in [1, window - 1] = [1, {window - 1}], got {stride}")
    out = []
    prev_end = 1  # index 0 has no prediction
    begin = 0
    while prev_end < length:
        end = min(begin + window, length)
        out.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    return out


def perplexity(
    model: Any,
    sequences: Sequence[Scored],
    window: int | None = None,
    stride: int | None = None,
    batch_tokens: int = 4096,
    progress: bool = False,
) -> dict[str, float]:
    """Token-weighted perplexity over `sequences`: {"nll" (sum), "tokens", "ppl"} (ppl NaN when nothing is
    scored). Windows of all sequences are batched by length, right-padded (padding only follows the scored
    tokens, so causal attention never sees it)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    window = window or model.config.max_position_embeddings
    stride = stride or max(1, window // 2)
    jobs = []  # (ids window, targets, target mask) with targets[j] predicted from position j
    for seq in sequences:
        if len(seq.ids) != len(seq.mask):
            raise ValueError("ids and mask differ in length")
        for begin, end, first in windows(len(seq.ids), window, stride):
            ids = seq.ids[begin:end]
            targets = seq.ids[begin + 1 : end]
            tmask = [m if begin + 1 + j >= first else 0 for j, m in enumerate(seq.mask[begin + 1 : end])]
            if any(tmask):
                jobs.append((ids, targets, tmask))
    jobs.sort(key=lambda j: len(j[0]))
    device = next(model.parameters()).device
    nll = 0.0
    count = 0
    bar = tqdm(total=sum(sum(j[2]) for j in jobs), desc="perplexity", unit="tok", disable=not progress)
    i = 0
    with torch.no_grad():
        while i < len(jobs):
            width = len(jobs[i][0])
            n = 1
            while i + n < len(jobs) and (n + 1) * len(jobs[i + n][0]) <= batch_tokens:
                n += 1
            batch = jobs[i : i + n]
            width = max(len(j[0]) for j in batch)
            ids = torch.zeros(n, width, dtype=torch.long)
            tgt = torch.zeros(n, width - 1, dtype=torch.long)
            msk = torch.zeros(n, width - 1, dtype=torch.bool)
            for r, (w_ids, w_tgt, w_mask) in enumerate(batch):
                ids[r, : len(w_ids)] = torch.tensor(w_ids)
                tgt[r, : len(w_tgt)] = torch.tensor(w_tgt)
                msk[r, : len(w_mask)] = torch.tensor(w_mask, dtype=torch.bool)
            pos = torch.arange(width).expand(n, width)
            logits = model(ids.to(device), pos.to(device))[:, :-1].float()  # [n, width-1, V]
            losses = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.to(device).reshape(-1), reduction="none"
            )
            losses = losses.view(n, width - 1)[msk.to(device)]
            nll += float(losses.double().sum())
            count += int(losses.numel())
            bar.update(int(losses.numel()))
            i += n
    bar.close()
    return {"nll": nll, "tokens": count, "ppl": math.exp(nll / count) if count else float("nan")}


# --- text metrics --------------------------------------------------------------------------------------------
_CJK = (
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\uac00-\ud7af"  # Hangul syllables
)
_WORD_RE = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])\w)+")


def words(text: str) -> list[str]:
    """Lowercased words; each CJK character is a word of its own (Chinese has no spaces to split on, and the
    character is the unit BLEU-zh and most Chinese ROUGE reports use)."""
    return _WORD_RE.findall(text.lower())


class CJKTokenizer:
    """rouge-score tokenizer interface (`tokenize(text) -> list[str]`). rouge-score's default keeps only
    [a-z0-9], so a Chinese summary scores 0 against its reference whatever it says."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


def sacrebleu_tokenize(lang: str | None) -> str:
    """sacrebleu's tokenizer for a target language: `zh` splits Chinese characters, `char` for Japanese and
    Korean (the `ja-mecab`/`ko-mecab` ones need MeCab), `13a` (the WMT default) otherwise."""
    lang = (lang or "").lower().split("-")[0]
    return {"zh": "zh", "ja": "char", "ko": "char"}.get(lang, "13a")


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str], tgt_lang: str | None) -> dict[str, Any]:
    from sacrebleu.metrics import BLEU, CHRF

    bleu = BLEU(tokenize=sacrebleu_tokenize(tgt_lang))
    chrf = CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (x100)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CJKTokenizer())
    totals = defaultdict(float)
    for hyp, ref in zip(hypotheses, references, strict=True):
        for name, score in scorer.score(ref, hyp).items():
            totals[name] += score.fmeasure
    n = max(len(hypotheses), 1)
    return {name: 100.0 * value / n for name, value in totals.items()}


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct unique n-grams / all n-grams over the whole set of generations (Li et al. 2016); NaN when there
    is no n-gram at all (empty answers are not "diverse" or "repetitive": the report shows them as `empty`)."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        grams.extend(ngrams(words(text), n))
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(texts: Iterable[str], n: int = 4) -> float:
    """seq-rep-n (Welleck et al. 2019): per generation the share of its n-grams that repeat an n-gram already
    in it, averaged over generations with at least one n-gram (NaN when none has one). 0 = no loops; a
    degenerate loop tends to 1."""
    rates = []
    for text in texts:
        grams = ngrams(words(text), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else float("nan")


def self_bleu(texts: Sequence[str], max_texts: int = 200) -> float:
    """Mean sentence BLEU of each generation against all the others (Zhu et al. 2018, Texygen): high = the
    model says the same thing to everyone. O(n^2), so at most `max_texts` (the first ones) are compared;
    `zh` tokenization so Chinese generations are compared by character."""
    from sacrebleu.metrics import BLEU

    texts = [t for t in texts[:max_texts] if t.strip()]
    if len(texts) < 2:
        return float("nan")
    bleu = BLEU(tokenize="zh", effective_order=True)
    scores = [bleu.sentence_score(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    return sum(scores) / len(scores)


# --- evaluator registry --------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One generated answer with everything an evaluator may need."""

    record: Any
    task: str
    prompt_ids: list[int]
    reference: str
    hypothesis: str = ""
    finish_reason: str = ""


@dataclass
class EvalContext:
    """What an evaluator may use beyond the samples: the model (e.g. to score intent labels by likelihood), its
    tokenizer and the run's options."""

    model: Any
    tokenizer: Any
    options: EvalOptions


@dataclass(frozen=True)
class Evaluator:
    name: str
    fn: Callable[[list[Sample], EvalContext], dict[str, Any]]
    tasks: tuple[str, ...] | None  # None: every task that generates


EVALUATORS: dict[str, Evaluator] = {}


def register_evaluator(name: str, tasks: Sequence[str] | None = None):
    """Decorator: `fn(samples of one task, context) -> {metric: value}` runs on the generations of `tasks` (all
    when None); a "signatures" entry in the result goes to the report's signature list. The task endpoints
    register their intent / retrieval metrics here (the CLI imports their module, e.g. for a `--tasks` flag), so
    `instructlm eval` reports them in the same table."""

    def wrap(fn: Callable[[list[Sample], EvalContext], dict[str, Any]]):
        EVALUATORS[name] = Evaluator(name, fn, tuple(tasks) if tasks is not None else None)
        return fn

    return wrap


@register_evaluator("translation", tasks=("translation",))
def _translation(samples: list[Sample], ctx: EvalContext) -> dict[str, Any]:
    """BLEU/chrF per target language (each with its own tokenizer), plus their means over languages."""
    by_lang: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_lang[str(s.record.meta.get("tgt_lang") or "unknown")].append(s)
    out: dict[str, Any] = {}
    for lang, group in sorted(by_lang.items()):
        scores = bleu_chrf([s.hypothesis for s in group], [s.reference for s in group], lang)
        out[f"bleu_{lang}"] = scores["bleu"]
        out[f"chrf_{lang}"] = scores["chrf"]
        out.setdefault("signatures", {})[f"bleu_{lang}"] = scores["bleu_signature"]
        out["signatures"]["chrf"] = scores["chrf_signature"]
    out["bleu"] = sum(out[f"bleu_{lang}"] for lang in by_lang) / len(by_lang)
    out["chrf"] = sum(out[f"chrf_{lang}"] for lang in by_lang) / len(by_lang)
    return out


@register_evaluator("rouge", tasks=("content", "customer_service", "qa"))
def _rouge(samples: list[Sample], ctx: EvalContext) -> dict[str, Any]:
    return rouge([s.hypothesis for s in samples], [s.reference for s in samples])


@register_evaluator("diversity")
def _diversity(samples: list[Sample], ctx: EvalContext) -> dict[str, Any]:
    texts = [s.hypothesis for s in samples]
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition_4": repetition_rate(texts, 4),
        "self_bleu": self_bleu(texts),
        "gen_words": sum(len(words(t)) for t in texts) / max(len(texts), 1),
        "empty": sum(not words(t) for t in texts) / max(len(texts), 1),
        "stopped": sum(s.finish_reason == "stop" for s in samples) / max(len(samples), 1),
    }


# --- the harness ---------------------------------------------------------------------------------------------
@dataclass
class EvalOptions:
    split: str = "test"
    tasks: list[str] | None = None  # only these record tasks
    metrics: list[str] | None = None  # evaluator names; None = all registered
    limit: int | None = None  # at most this many records per task (first ones, the split's order)
    max_new_tokens: int = 64
    window: int | None = None  # perplexity window; None = the model's context
    stride: int | None = None  # None = window // 2
    generate: bool = True
    batch_size: int = 8
    progress: bool = True

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise EvalError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        for name in ("limit", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvalError(f"{name} must be at least 1, got {value}")
        if self.window is not None and self.window < 2:
            raise EvalError(f"window must be at least 2, got {self.window}")
        if self.stride is not None and not 1 <= self.stride <= (self.window or 2**31) - 1:
            raise EvalError(f"stride must be in [1, window - 1], got {self.stride} (window {self.window})")


@dataclass
class EvalResult:
    per_task: dict[str, dict[str, Any]]
    overall: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def split_prompt(tokenizer: Any, record: Any) -> tuple[list[int], str] | None:
    """Prompt ids (everything before the last assistant turn, plus the generation prompt) and that turn's text;
    None for a record with nothing to answer."""
    from model.chat import encode_chat

    if record.kind != "chat" or not record.messages:
        return None
    last = max((i for i, m in enumerate(record.messages) if m.role == "assistant"), default=None)
    if last is None or last == 0:
        return None
    messages = [{"role": m.role, "content": m.content} for m in record.messages[:last]]
    return encode_chat(tokenizer, messages, add_generation_prompt=True).ids, record.messages[last].content


def generate_samples(model: Any, tokenizer: Any, samples: list[Sample], options: EvalOptions) -> int:
    """Fill each sample's hypothesis (greedy); returns how many were skipped for not fitting the context."""
    from tqdm import tqdm

    from model.generate import generate
    from model.sampling import GREEDY

    context = model.config.max_position_embeddings
    todo = [s for s in samples if len(s.prompt_ids) < context]
    skipped = len(samples) - len(todo)
    todo.sort(key=lambda s: len(s.prompt_ids))  # similar lengths together: less padding per batch
    bar = tqdm(total=len(todo), desc="generate", unit="ex", disable=not options.progress)
    for i in range(0, len(todo), options.batch_size):
        batch = todo[i : i + options.batch_size]
        budget = min(options.max_new_tokens, context - max(len(s.prompt_ids) for s in batch))
        outs = generate(model, [s.prompt_ids for s in batch], budget, GREEDY, stop_ids=tokenizer.stop_ids)
        for s, out in zip(batch, outs, strict=True):
            s.hypothesis = tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
            s.finish_reason = out.finish_reason
        bar.update(len(batch))
    bar.close()
    for s in samples:
        if len(s.prompt_ids) >= context:
            s.finish_reason = "skipped"
    return skipped


def evaluate(
    model: Any, tokenizer: Any, records: Sequence[Any], options: EvalOptions | None = None
) -> EvalResult:
    options = options or EvalOptions()
    options.validate()
    context = model.config.max_position_embeddings
    if options.window is not None and options.window > context:
        raise EvalError(f"window {options.window} exceeds the model's context {context}")
    if options.stride is not None and options.stride >= (options.window or context):
        raise EvalError(
            f"stride {options.stride} must be smaller than the window {options.window or context}"
        )
    names = options.metrics if options.metrics is not None else list(EVALUATORS)
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise EvalError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(EVALUATORS)}")
    by_task: dict[str, list[Any]] = defaultdict(list)
    for r in records:
        if options.limit is None or len(by_task[r.task]) < options.limit:
            by_task[r.task].append(r)
    per_task: dict[str, dict[str, Any]] = {}
    all_samples: list[Sample] = []
    total_nll, total_tokens = 0.0, 0
    signatures: dict[str, str] = {}
    for task in sorted(by_task):
        recs = by_task[task]
        row: dict[str, Any] = {"records": len(recs)}
        ppl = perplexity(
            model,
            [scored_sequence(tokenizer, r) for r in recs],
            options.window,
            options.stride,
            progress=options.progress,
        )
        row.update({"ppl": ppl["ppl"], "tokens": ppl["tokens"]})
        total_nll += ppl["nll"]
        total_tokens += ppl["tokens"]
        if options.generate:
            samples = []
            for r in recs:
                split = split_prompt(tokenizer, r)
                if split is not None:
                    samples.append(Sample(r, task, split[0], split[1]))
            if samples:
                row["generated"] = len(samples) - generate_samples(model, tokenizer, samples, options)
                done = [s for s in samples if s.finish_reason != "skipped"]
                for name in names:
                    ev = EVALUATORS[name]
                    if done and (ev.tasks is None or task in ev.tasks):
                        metrics = ev.fn(done, EvalContext(model, tokenizer, options))
                        for key, value in metrics.pop("signatures", {}).items():
                            signatures[key] = value
                        row.update(metrics)
                all_samples.extend(samples)
        per_task[task] = row
    overall = {
        "records": sum(len(v) for v in by_task.values()),
        "tokens": total_tokens,
        "ppl": math.exp(total_nll / total_tokens) if total_tokens else float("nan"),
    }
    return EvalResult(per_task, overall, all_samples, {"signatures": signatures})


# --- report --------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
    return str(value)


def markdown_table(per_task: dict[str, dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in per_task.values():
        for key in row:
            if key not in columns:
                columns.append(key)
    lines = ["| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for task, row in per_task.items():
        lines.append(f"| {task} | " + " | ".join(_fmt(row.get(c, float("nan"))) for c in columns) + " |")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def plot(result: EvalResult, out_dir: Path) -> list[Path]:
    """eval_perplexity.png (per task) and eval_metrics.png (the 0..100 / 0..1 metrics per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks = list(result.per_task)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(tasks)), 3.5))
    ax.bar(tasks, [result.per_task[t]["ppl"] for t in tasks], color="tab:blue")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"perplexity per task (overall {result.overall['ppl']:.2f})")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(out_dir / "eval_perplexity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    percent = ["bleu", "chrf", "rouge1", "rouge2", "rougeL", "self_bleu"]
    ratio = ["distinct_1", "distinct_2", "repetition_4", "stopped", "empty"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, keys, label in ((axes[0], percent, "score (0-100)"), (axes[1], ratio, "ratio (0-1)")):
        present = [k for k in keys if any(k in r for r in result.per_task.values())]
        width = 0.8 / max(len(present), 1)
        for j, key in enumerate(present):
            values = [result.per_task[t].get(key, 0.0) or 0.0 for t in tasks]
            ax.bar([i + j * width for i in range(len(tasks))], values, width, label=key)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=30)
        ax.set_ylabel(label)
        if present:
            ax.legend(fontsize=7)
    fig.suptitle("generation metrics per task")
    fig.tight_layout()
    paths.append(out_dir / "eval_metrics.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(result: EvalResult, out_dir: str | Path, examples: int = 3) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = defaultdict(list)
    for s in result.samples:
        if len(shown[s.task]) < examples and s.finish_reason != "skipped":
            shown[s.task].append(
                {
                    "id": s.record.id,
                    "reference": s.reference,
                    "hypothesis": s.hypothesis,
                    "finish": s.finish_reason,
                }
            )
    payload = {
        "info": result.info,
        "overall": result.overall,
        "per_task": result.per_task,
        "examples": dict(shown),
    }
    json_path = out_dir / "eval.json"
    json_path.write_text(
        json.dumps(_json_safe(payload), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    pngs = plot(result, out_dir)
    info = result.info
    md = [
        f"# Evaluation: {info.get('checkpoint', '')}",
        "",
        f"Dataset `{info.get('dataset', '')}`, split `{info.get('split', '')}`; overall token-weighted perplexity "
        f"**{_fmt(result.overall['ppl'])}** over {result.overall['tokens']} tokens "
        f"({result.overall['records']} records).",
        "",
        markdown_table(result.per_task),
        "",
        "ppl: token-weighted perplexity of the answer tokens (text: all tokens). bleu/chrf: sacrebleu, mean over "
        "target languages (per language in bleu_xx). rouge*: F-measure x100, CJK characters kept. distinct_n: "
        "unique n-grams / n-grams. repetition_4: seq-rep-4. self_bleu: BLEU of each answer against the others. "
        "stopped: share of answers that ended with a stop token within the budget. empty: share of empty answers.",
        "",
    ]
    if info.get("signatures"):
        md += (
            ["## sacrebleu signatures", ""]
            + [f"- {k}: `{v}`" for k, v in sorted(info["signatures"].items())]
            + [""]
        )
    md += [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    for task, items in shown.items():
        md += [f"## Examples: {task}", ""]
        for item in items:
            md += [f"- reference: {item['reference'][:200]!r}", f"  generated: {item['hypothesis'][:200]!r}"]
        md.append("")
    md_path = out_dir / "eval.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    return {"json": json_path, "md": md_path, **{p.stem: p for p in pngs}}


def run_eval(
    checkpoint: str | Path,
    dataset: str | Path,
    out_dir: str | Path | None = None,
    options: EvalOptions | None = None,
    tokenizer_dir: str | Path | None = None,
    device: str = "cpu",
) -> EvalResult:
    """Load, check, evaluate, and (with out_dir) write eval.json / eval.md / PNGs."""
    from model.checkpoint import load_checkpoint, load_config
    from model.tokenizer import Tokenizer

    options = options or EvalOptions()
    checkpoint = Path(checkpoint)
    config = load_config(checkpoint)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else checkpoint
    tokenizer = Tokenizer.load(tok_dir)
    check_tokenizer(tokenizer, config, str(tok_dir))
    own = checkpoint / "tokenizer.json"
    if (
        tokenizer_dir
        and own.is_file()
        and Tokenizer.load(checkpoint).hf.get_vocab() != tokenizer.hf.get_vocab()
    ):
        raise CheckpointError(
            f"{tok_dir}: its vocabulary differs from the tokenizer saved with the checkpoint ({own}): "
            "the model was trained on other token ids"
        )
    options.validate()
    records = load_split(dataset, options.split, options.tasks)
    model = load_checkpoint(checkpoint, device=device)
    result = evaluate(model, tokenizer, records, options)
    result.info.update({"checkpoint": str(checkpoint), "dataset": str(dataset), "split": options.split})
    if out_dir is not None:
        write_report(result, out_dir)
    return result

"""Task evaluation (`instructlm eval --tasks`): each endpoint's quality next to a simple non-LM baseline.

- intent: rank-classification accuracy and macro-F1 on the held-out utterances (data/seed/intents.jsonl, test),
  temperature fitted on the val split, ECE before/after; baseline: 1-nearest-neighbour over the train
  utterances (cosine of tf-idf vectors of the retrieval tokens);
- retrieval: recall@1/@3 of BM25 over the FAQ for the held-out paraphrases; baseline: chance (k / entries);
- translation: BLEU/chrF (sacrebleu, `zh` tokenization for Chinese) of the test pairs, sentence-split and
  batch-translated as the endpoint does; baseline: copy the source;
- content: ROUGE-L (CJK-aware) against the reference, keyword coverage and length ratio; baseline: the brief
  itself (topic and keywords) as the text.

The metric functions (BLEU/chrF, ROUGE) are the evaluation harness's, passed in by the CLI (service code never
imports training code). Writes tasks.json, tasks.md, intent_calibration.json and a reliability diagram.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from model.errors import UserError
from service.tasks import content as C
from service.tasks import customer_service as CS
from service.tasks import translation as T
from service.tasks.calibration import expected_calibration_error, softmax
from service.tasks.retrieval import KnowledgeBase, tokenize


def macro_f1(gold: list[str], pred: list[str], labels: list[str]) -> float:
    """Mean over labels of F1 = 2TP / (2TP + FP + FN); a label neither present nor predicted is left out."""
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, pred, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, pred, strict=True))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def nearest_neighbour(train: list[tuple[str, str]], queries: list[str]) -> list[str]:
    """1-NN by cosine of tf-idf vectors (idf = ln(N / df) + 1) of the retrieval tokens; ties: first seen."""
    docs = [Counter(tokenize(t)) for t, _ in train]
    df = Counter(t for d in docs for t in d)
    n = len(docs)
    idf = {t: math.log(n / c) + 1.0 for t, c in df.items()}

    def vec(counts: Counter) -> dict[str, float]:
        v = {t: c * idf.get(t, 0.0) for t, c in counts.items() if t in idf}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {t: x / norm for t, x in v.items()}

    vecs = [vec(d) for d in docs]
    out = []
    for q in queries:
        qv = vec(Counter(tokenize(q)))
        sims = [sum(w * dv.get(t, 0.0) for t, w in qv.items()) for dv in vecs]
        out.append(train[int(np.argmax(sims))][1])
    return out


def retrieval_recall(seed_dir: Path, encoder: str | Path | None = None, threads: int = 1) -> dict[str, Any]:
    """Recall@1/@3 of the FAQ paraphrases: BM25, and with an encoder directory also hybrid and dense alone."""
    faq = [
        json.loads(line) for line in (seed_dir / "faq.jsonl").read_text(encoding="utf-8").splitlines() if line
    ]
    queries = [(p, row["id"]) for row in faq for p in row["paraphrases"]]

    def recall(kb: KnowledgeBase, min_score: float = 0.0) -> tuple[float, float]:
        ranks = [[h.entry.id for h in kb.search(q, k=3, min_score=min_score)] for q, _ in queries]
        at1 = float(np.mean([r[:1] == [i] for r, (_, i) in zip(ranks, queries, strict=True)]))
        return at1, float(np.mean([i in r for r, (_, i) in zip(ranks, queries, strict=True)]))

    kb = KnowledgeBase.load(seed_dir / "faq.jsonl")
    r1, r3 = recall(kb)
    out: dict[str, Any] = {
        "queries": len(queries),
        "entries": len(kb.entries),
        "recall_at_1": r1,
        "recall_at_3": r3,
        "baseline_chance_at_1": 1 / len(kb.entries),
        "baseline_chance_at_3": 3 / len(kb.entries),
    }
    if encoder:
        from service.tasks.encoder import SentenceEncoder
        from service.tasks.retrieval import DENSE_WEIGHT

        enc = SentenceEncoder(encoder, threads=threads)
        for name, weight in (("hybrid", DENSE_WEIGHT), ("dense", 1.0)):
            # Cosines can be negative: every entry ranks, as in BM25 every entry with a shared term does.
            a1, a3 = recall(KnowledgeBase.load(seed_dir / "faq.jsonl", enc, weight), min_score=-2.0)
            out[f"{name}_recall_at_1"] = a1
            out[f"{name}_recall_at_3"] = a3
    return out


def reliability_png(probs_before, probs_after, labels, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    bins = np.linspace(0, 1, 11)
    for probs, name in ((probs_before, "T = 1"), (probs_after, "fitted T")):
        conf = probs.max(1)
        correct = probs.argmax(1) == np.asarray(labels)
        xs, ys = [], []
        for lo, hi in zip(bins[:-1], bins[1:], strict=True):
            m = (conf > lo) & (conf <= hi)
            if m.any():
                xs.append(conf[m].mean())
                ys.append(correct[m].mean())
        ax.plot(xs, ys, marker="o", label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("intent: reliability on the test utterances")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Pair(msgspec.Struct):
    id: str
    src_lang: str
    tgt_lang: str
    source: str
    target: str
    split: str


class _Brief(msgspec.Struct):
    id: str
    kind: str
    topic: str
    keywords: list[str]
    tone: str
    target_words: int
    output: str
    split: str


def _jsonl(path: Path, kind: type) -> list:
    if not path.is_file():
        raise UserError(f"{path}: seed file not found (needed by `eval --tasks`)")
    return [
        msgspec.json.decode(line, type=kind) for line in path.read_text(encoding="utf-8").splitlines() if line
    ]


def run_task_eval(
    checkpoint: str | Path,
    seed_dir: str | Path,
    out_dir: str | Path,
    *,
    bleu_chrf: Callable[[list[str], list[str], str], dict[str, Any]],
    rouge: Callable[[list[str], list[str]], dict[str, float]],
    limit: int | None = None,
    threads: int = 1,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    encoder: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    from tqdm import tqdm

    from model.generate import generate
    from model.sampling import GREEDY
    from model.tokenizer import Tokenizer
    from service.runners.base import open_runner

    seed_dir, out_dir = Path(seed_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.load(checkpoint)
    labels = CS.load_intent_labels(seed_dir / "intent_labels.jsonl")
    runner = open_runner(checkpoint, "torch", num_slots=len(labels), threads=threads)
    window = runner.max_len
    results: dict[str, Any] = {"checkpoint": str(checkpoint), "seed_dir": str(seed_dir)}

    # --- intent ---------------------------------------------------------------------------------------------
    clf = CS.IntentClassifier(tokenizer, labels)
    scorer = CS.runner_scorer(runner, list(range(len(labels))))
    names = clf.names

    def score_split(split: str):
        utts = CS.load_utterances(seed_dir / "intents.jsonl", split)[: limit or None]
        rows = []
        for u in tqdm(utts, desc=f"intent {split}", unit="utt", disable=not progress):
            longest = max(len(r) for r in clf.rows(u.text)[0])
            if longest > window:
                raise UserError(
                    f"intent prompt of {u.id} takes {longest} tokens; the model's window is {window}"
                )
            rows.append(clf.classify(u.text, scorer).scores)
        return utts, np.array(rows), [names.index(u.intent) for u in utts]

    _, val_scores, val_y = score_split("val")
    cal = CS.calibrate(val_scores, val_y)
    test_utts, test_scores, test_y = score_split("test")
    p1, pt = softmax(test_scores), softmax(test_scores, cal.temperature)
    pred = [names[i] for i in p1.argmax(1)]
    gold = [u.intent for u in test_utts]
    train = [(u.text, u.intent) for u in CS.load_utterances(seed_dir / "intents.jsonl", "train")]
    nn = nearest_neighbour(train, [u.text for u in test_utts])
    handoff = [bool(labels[names.index(p)].handoff) or c < 0.4 for p, c in zip(pred, pt.max(1), strict=True)]
    results["intent"] = {
        "test_utterances": len(gold),
        "accuracy": float(np.mean([g == p for g, p in zip(gold, pred, strict=True)])),
        "macro_f1": macro_f1(gold, pred, names),
        "baseline_nn_accuracy": float(np.mean([g == p for g, p in zip(gold, nn, strict=True)])),
        "baseline_nn_macro_f1": macro_f1(gold, nn, names),
        "temperature": cal.temperature,
        "val_utterances": cal.n,
        "ece_before": expected_calibration_error(p1, test_y),
        "ece_after": expected_calibration_error(pt, test_y),
        "handoff_rate_at_0.4": float(np.mean(handoff)),
    }
    (out_dir / "intent_calibration.json").write_text(
        json.dumps(
            {
                "temperature": cal.temperature,
                "ece_before": cal.ece_before,
                "ece_after": cal.ece_after,
                "nll_before": cal.nll_before,
                "nll_after": cal.nll_after,
                "n": cal.n,
            },
            indent=2,
        )
        + "\n"
    )
    reliability_png(p1, pt, test_y, out_dir / "intent_reliability.png")

    # --- retrieval ------------------------------------------------------------------------------------------
    results["retrieval"] = retrieval_recall(seed_dir, encoder, threads)

    model = runner.model
    stop = tokenizer.stop_ids

    def run_generation(prompts: list[list[int]], budgets: list[int], desc: str) -> list[str]:
        if max_new_tokens is not None:
            budgets = [min(b, max_new_tokens) for b in budgets]
        outs = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            budget = min(max(budgets[i] for i in idx), window - max(len(prompts[i]) for i in idx))
            if budget < 1:
                bar.update(len(idx))
                continue
            gens = generate(model, [prompts[i] for i in idx], budget, GREEDY, stop_ids=stop)
            for i, g in zip(idx, gens, strict=True):
                outs[i] = tokenizer.decode(g.tokens[: budgets[i]], skip_special_tokens=True).strip()
            bar.update(len(idx))
        bar.close()
        return outs

    # --- translation ----------------------------------------------------------------------------------------
    pairs = [p for p in _jsonl(seed_dir / "translation.jsonl", _Pair) if p.split == "test"]
    by_dir: dict[tuple[str, str], list[_Pair]] = defaultdict(list)
    for p in pairs:
        if limit is None or len(by_dir[(p.src_lang, p.tgt_lang)]) < limit:
            by_dir[(p.src_lang, p.tgt_lang)].append(p)
    prompts, budgets, owner, plans = [], [], [], []
    flat = [p for d in sorted(by_dir) for p in by_dir[d]]
    for k, p in enumerate(flat):
        segs = T.plan([p.source])[0]
        plans.append(segs)
        for seg in segs:
            prompt = T.sentence_prompt(tokenizer, seg.text, p.src_lang, p.tgt_lang)
            prompts.append(prompt)
            budgets.append(int(len(tokenizer.encode(seg.text)) * 3.0) + 16)
            owner.append(k)
    outs = run_generation(prompts, budgets, "translate")
    hyps = []
    for k, p in enumerate(flat):
        hyps.append(T.join([o for o, w in zip(outs, owner, strict=True) if w == k], plans[k], p.tgt_lang))
    tr: dict[str, Any] = {"signatures": {}}
    for d in sorted(by_dir):
        idx = [k for k, p in enumerate(flat) if (p.src_lang, p.tgt_lang) == d]
        refs = [flat[k].target for k in idx]
        model_s = bleu_chrf([hyps[k] for k in idx], refs, d[1])
        copy_s = bleu_chrf([flat[k].source for k in idx], refs, d[1])
        tr[f"{d[0]}-{d[1]}"] = {
            "pairs": len(idx),
            "bleu": model_s["bleu"],
            "chrf": model_s["chrf"],
            "baseline_copy_bleu": copy_s["bleu"],
            "baseline_copy_chrf": copy_s["chrf"],
        }
        tr["signatures"][d[1]] = model_s["bleu_signature"]
        tr["signatures"]["chrf"] = model_s["chrf_signature"]
    tr["examples"] = [
        {"source": p.source, "reference": p.target, "model": h}
        for p, h in list(zip(flat, hyps, strict=True))[:3]
    ]
    results["translation"] = tr

    # --- content --------------------------------------------------------------------------------------------
    briefs = [b for b in _jsonl(seed_dir / "content.jsonl", _Brief) if b.split == "test"][: limit or None]
    prompts = [
        C.content_prompt(tokenizer, b.kind, b.topic, b.keywords, b.tone, b.target_words) for b in briefs
    ]
    texts = run_generation(prompts, [int(b.target_words * 2.0) + 16 for b in briefs], "content")
    cov = [C.coverage(t, b.keywords) for t, b in zip(texts, briefs, strict=True)]
    base = [f"{b.topic}. {', '.join(b.keywords)}." for b in briefs]
    results["content"] = {
        "briefs": len(briefs),
        "rougeL": rouge(texts, [b.output for b in briefs])["rougeL"],
        "keyword_coverage": float(np.mean([c[1] for c in cov])),
        "length_ratio": float(np.mean([c[2] / b.target_words for c, b in zip(cov, briefs, strict=True)])),
        "baseline_brief_rougeL": rouge(base, [b.output for b in briefs])["rougeL"],
        "baseline_brief_keyword_coverage": 1.0,
    }
    (out_dir / "tasks.json").write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "tasks.md").write_text(task_markdown(results), encoding="utf-8")
    return results


def task_markdown(r: dict[str, Any]) -> str:
    i, q, c = r["intent"], r["retrieval"], r["content"]
    lines = [
        "## Task endpoints",
        "",
        "| task | metric | model | baseline |",
        "|---|---|---|---|",
        f"| intent ({i['test_utterances']} test utterances) | accuracy | {i['accuracy']:.3f} | "
        f"{i['baseline_nn_accuracy']:.3f} (1-NN tf-idf) |",
        f"| intent | macro-F1 | {i['macro_f1']:.3f} | {i['baseline_nn_macro_f1']:.3f} (1-NN tf-idf) |",
        f"| intent | ECE (15 bins), T = 1 → fitted T = {i['temperature']:.2f} | {i['ece_before']:.3f} → "
        f"{i['ece_after']:.3f} | |",
        f"| retrieval ({q['queries']} paraphrases, {q['entries']} entries) | recall@1 | {q['recall_at_1']:.3f} | "
        f"{q['baseline_chance_at_1']:.3f} (chance) |",
        f"| retrieval | recall@3 | {q['recall_at_3']:.3f} | {q['baseline_chance_at_3']:.3f} (chance) |",
    ]
    for name in ("hybrid", "dense"):
        if f"{name}_recall_at_1" in q:
            lines.append(
                f"| retrieval, {name} (encoder) | recall@1 / @3 | {q[f'{name}_recall_at_1']:.3f} / "
                f"{q[f'{name}_recall_at_3']:.3f} | BM25 {q['recall_at_1']:.3f} / {q['recall_at_3']:.3f} |"
            )
    for key, v in r["translation"].items():
        if isinstance(v, dict) and "bleu" in v:
            lines.append(
                f"| translation {key} ({v['pairs']} pairs) | BLEU / chrF | {v['bleu']:.1f} / {v['chrf']:.1f} | "
                f"{v['baseline_copy_bleu']:.1f} / {v['baseline_copy_chrf']:.1f} (copy source) |"
            )
    lines += [
        f"| content ({c['briefs']} briefs) | ROUGE-L | {c['rougeL']:.1f} | {c['baseline_brief_rougeL']:.1f} "
        "(brief as text) |",
        f"| content | keyword coverage | {c['keyword_coverage']:.3f} | 1.000 (brief as text) |",
        f"| content | length / target words | {c['length_ratio']:.2f} | |",
        "",
        "sacrebleu signatures: "
        + "; ".join(f"{k}: `{v}`" for k, v in sorted(r["translation"].get("signatures", {}).items())),
        "",
        "![intent reliability](intent_reliability.png)",
        "",
    ]
    return "\n".join(lines)

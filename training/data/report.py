"""report.md and report/*.png: lengths, task mixture before/after balancing, rejection reasons, duplicate and
split clusters, and the Self-Instruct diversity view (root verbs of instructions and their objects).

Diversity heuristic, English (Self-Instruct parses with Berkeley's parser; we download no model): drop leading
politeness ("please", "can you", "I want you to"...); an instruction whose first word is a question word or an
auxiliary is counted as a question under that word ("how?", "what?"); otherwise the first word is the root verb
(instructions are imperatives; a first word that cannot start one, such as a pronoun, article or greeting, marks
a statement, which is not counted) and the first following word that is not a determiner, pronoun or
preposition is its object. Chinese: jieba's part-of-speech tagger (bundled dictionary, no download): the first verb (v*) and the
first noun (n*) after it.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

FILLERS = re.compile(
    r"^(?:(?:please|kindly|now|ok|okay|hey|hi|hello)[,!.]?\s+|(?:can|could|would|will) you\s+(?:please\s+)?|"
    r"i (?:want|need|would like) (?:you )?to\s+|help me\s+|let's\s+)+",
    re.I,
)
QUESTION_WORDS = set(["what", "how", "why", "who", "whom", "whose", "where", "when", "which", "is", "are", "was", "were", "do", "does", "did", "can", "could", "would", "will", "should", "shall", "may", "might", "have", "has", "had", "am"])  # fmt: skip
SKIP = set(["a", "an", "the", "this", "that", "these", "those", "my", "your", "our", "their", "his", "her", "its", "some", "any", "all", "each", "every", "me", "you", "it", "them", "us", "him", "to", "of", "for", "in", "on", "at", "by", "with", "about", "from", "into", "as", "and", "or"])  # fmt: skip
# A first word that cannot start an imperative: the instruction is a statement or a greeting, not counted.
NOT_A_VERB = SKIP | {
    "i", "i'm", "im", "we", "he", "she", "they", "there", "here", "if", "hello", "hi", "hey", "thanks", "thank",
    "yes", "no", "ok", "okay", "so", "well", "oh", "good", "great", "nice", "sorry", "sure", "maybe", "not", "just",
    "also", "really", "very", "that's", "it's", "ich", "wir", "sie", "es", "der", "die", "das",
}  # fmt: skip
NUMBER_WORDS = {
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "several",
    "few",
    "many",
}
ZH_POLITE = {"请", "帮", "帮忙", "麻烦", "能", "可以"}  # "请写…" ("please write"): the verb is 写
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
CJK = re.compile(r"[\u4e00-\u9fff]")


def verb_object(instruction: str) -> tuple[str, str] | None:
    text = FILLERS.sub("", instruction.strip())
    if CJK.search(text[:50]):
        return _verb_object_zh(text)
    words = [w.lower() for w in WORD.findall(text.split("\n", 1)[0])[:12]]
    if not words:
        return None
    if words[0] in QUESTION_WORDS:
        return f"{words[0]}?", ""
    if words[0] in NOT_A_VERB:
        return None
    obj = next((w for w in words[1:] if w not in SKIP and w not in NUMBER_WORDS), "")
    return words[0], obj


def _verb_object_zh(text: str) -> tuple[str, str] | None:
    import logging

    import jieba
    import jieba.posseg as pseg

    jieba.setLogLevel(logging.WARNING)
    verb = None
    for pair in pseg.cut(text[:60]):
        if verb is None and pair.flag.startswith("v") and pair.word not in ZH_POLITE:
            verb = pair.word
        elif verb is not None and pair.flag.startswith("n"):
            return verb, pair.word
    return (verb, "") if verb else None


def diversity(instructions: list[str]) -> Counter[tuple[str, str]]:
    return Counter(vo for vo in map(verb_object, instructions) if vo)


def _save(fig: Any, path: Path) -> None:
    # No "Software" tag: the PNG bytes then depend only on the data (the build is byte-identical).
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _mixture(manifest: dict[str, Any], data: Any) -> list[tuple[str, int, int, float]]:
    c = manifest["counts"]
    tasks = sorted(set(data.train_before) | set(manifest["mixing"]["weights"]))
    return [(t, data.train_before.get(t, 0), c["train_by_task_with_derived"].get(t, 0),
             manifest["mixing"]["weights"].get(t, 0.0)) for t in tasks]  # fmt: skip


def _reasons(manifest: dict[str, Any]) -> list[tuple[str, int]]:
    return sorted(manifest["counts"]["rejected_by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))[:15]


def _split_diversity(div: Counter[tuple[str, str]]) -> tuple[Counter, Counter, Counter]:
    english = Counter({vo: n for vo, n in div.items() if not CJK.search(vo[0])})
    chinese = Counter({vo: n for vo, n in div.items() if CJK.search(vo[0])})
    verbs: Counter[str] = Counter()
    for (v, _), n in english.items():
        verbs[v] += n
    return english, chinese, verbs


def draw_pictures(pics: Path, manifest: dict[str, Any], data: Any, div: Counter[tuple[str, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warnings.filterwarnings("ignore", message="Glyph .* missing from font")
    pics.mkdir(exist_ok=True)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for task, pairs in sorted(data.lengths.items()):
        for ax, idx in ((axes[0], 0), (axes[1], 1)):
            ax.hist([max(1, p[idx]) for p in pairs], bins=30, alpha=0.5, label=task, log=True)
    axes[0].set_xlabel("prompt words")
    axes[1].set_xlabel("answer words")
    if data.lengths:
        axes[0].legend(fontsize=8)
    fig.suptitle("Record lengths by task (kept records)")
    fig.tight_layout()
    _save(fig, pics / "lengths.png")
    plt.close(fig)

    rows = _mixture(manifest, data)
    total_before = max(1, sum(r[1] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = list(range(len(rows)))
    ax.bar(
        [x - 0.2 for x in xs],
        [r[1] / total_before for r in rows],
        width=0.4,
        label="train share before balancing",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [r[3] for r in rows],
        width=0.4,
        label="mixing weight (trainer samples by this)",
    )
    ax.set_xticks(xs, [r[0] for r in rows], rotation=20)
    ax.set_ylabel("share")
    ax.legend()
    fig.tight_layout()
    _save(fig, pics / "mixture.png")
    plt.close(fig)

    reasons = _reasons(manifest)
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.35 * len(reasons) + 1)))
    ax.barh([r[:60] for r, _ in reversed(reasons)], [n for _, n in reversed(reasons)])
    ax.set_xlabel("records")
    ax.set_title("Rejection reasons")
    fig.tight_layout()
    _save(fig, pics / "rejections.png")
    plt.close(fig)

    sizes = Counter(1 + n for n in data.dup_clusters.values())
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    axes[0].bar([str(k) for k in sorted(sizes)], [sizes[k] for k in sorted(sizes)])
    axes[0].set_title("Duplicate clusters (kept record + its duplicates)")
    axes[0].set_xlabel("cluster size")
    gs = data.group_sizes
    axes[1].bar([str(k) for k in sorted(gs)], [gs[k] for k in sorted(gs)], log=True)
    axes[1].set_title("Similarity clusters kept in one split")
    axes[1].set_xlabel("cluster size")
    fig.tight_layout()
    _save(fig, pics / "clusters.png")
    plt.close(fig)

    english, _, verbs = _split_diversity(div)
    top_verbs = [v for v, _ in sorted(verbs.items(), key=lambda kv: (-kv[1], kv[0]))[:20]]
    fig, ax = plt.subplots(figsize=(10, 6))
    for rank, verb in enumerate(reversed(top_verbs)):
        objs = sorted(((o, n) for (v, o), n in english.items() if v == verb), key=lambda on: (-on[1], on[0]))
        left = 0
        for o, n in objs[:4]:
            ax.barh(rank, n, left=left)
            if n >= max(1, verbs[top_verbs[0]] // 25):
                ax.text(left + n / 2, rank, o or "-", ha="center", va="center", fontsize=7)
            left += n
        rest = sum(n for _, n in objs[4:])
        if rest:
            ax.barh(rank, rest, left=left, color="lightgrey")
    ax.set_yticks(range(len(top_verbs)), list(reversed(top_verbs)))
    ax.set_xlabel("instructions (segments: the verb's 4 most frequent objects, grey: others)")
    ax.set_title("Root verbs of instructions and their objects (English)")
    fig.tight_layout()
    _save(fig, pics / "diversity.png")
    plt.close(fig)


def write_report(out: Path, manifest: dict[str, Any], data: Any, pictures: bool = True) -> None:
    """report.md (always) and, when `pictures`, report/*.png."""
    c = manifest["counts"]
    div = diversity(data.instructions)

    def pic(name: str) -> list[str]:
        return [f"![{name}](report/{name}.png)", ""] if pictures else []

    lines = [
        f"# Dataset report: {manifest['name']}",
        "",
        f"Config hash `{manifest['config_hash'][:16]}`. Every input is accounted for: "
        f"**{c['inputs']} inputs = {c['kept']} kept + {c['rejected']} rejected + {c['duplicates']} duplicates**; "
        f"{c['derived']} records derived by augmentation (train only) are counted apart.",
        "",
        "| split | records |",
        "|---|---|",
        *[f"| {s} | {n} |" for s, n in c["by_split"].items()],
        "",
        "## Sources",
        "",
        "| source | reader | inputs | kept | rejected | duplicates |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {s['reader']} | {s['inputs']} | {s['kept']} | {s['rejected']} | {s['duplicates']} |"
          for n, s in c["by_source"].items()],
        "",
        "## Task mixture",
        "",
        *pic("mixture"),
        f"Mixing: cap {manifest['mixing']['cap']}, temperature {manifest['mixing']['temperature']} "
        "(T5 examples-proportional mixing; `training.data.mixing` applies it).",
        "",
        "| task | train (original) | train (with derived) | weight | val | test |",
        "|---|---|---|---|---|---|",
        *[f"| {t} | {b} | {a} | {w:.3f} | {c['by_task'].get(t, {}).get('val', 0)} | "
          f"{c['by_task'].get(t, {}).get('test', 0)} |" for t, b, a, w in _mixture(manifest, data)],
        "",
        "## Rejections",
        "",
        *pic("rejections"),
        "| stage: reason | records |",
        "|---|---|",
        *[f"| {r} | {n} |" for r, n in _reasons(manifest)],
    ]  # fmt: skip
    st = c["by_stage"]
    lines += ["", "## Duplicates and leak-free splits", "", *pic("clusters"),
              f"Duplicates by method: {st['duplicates'] or 'none'}. Similarity links between kept records: "
              f"{st['split']['clusters_linked']}; records moved to a held-out split with their cluster: "
              f"{st['split']['moved_by_cluster']}; derived records dropped for resembling a held-out record: "
              f"{st['augment']['dropped_similar_to_held_out']}.", ""]  # fmt: skip
    top = data.dup_clusters.most_common(5)
    if top:
        lines += [
            "Largest duplicate clusters (kept id: duplicates): " + ", ".join(f"`{k}`: {n}" for k, n in top),
            "",
        ]
    _, chinese, verbs = _split_diversity(div)
    top_verbs = sorted(verbs.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    lines += ["## Diversity (Self-Instruct view)", "", *pic("diversity"),
              f"{len(data.instructions)} instructions; {len(verbs)} distinct English root verbs or question words "
              f"(top: {', '.join(f'{v} ({n})' for v, n in top_verbs) or 'none'}); "
              f"{len({v for v, _ in chinese})} distinct Chinese verbs.", ""]  # fmt: skip
    if chinese:
        top_zh = sorted(chinese.items(), key=lambda kv: (-kv[1], kv[0]))[:15]
        lines += ["Chinese (jieba POS): " + ", ".join(f"{v}→{o or '-'} ({n})" for (v, o), n in top_zh), ""]
    lines += ["## Lengths", "", *pic("lengths")]
    if pictures:
        draw_pictures(out / "report", manifest, data, div)
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

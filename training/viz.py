"""Looking inside the model: attention heatmaps per layer and head, and gradient x input attribution of an
answer to its prompt tokens, as PNGs with the tokens on the axes.

Attention weights are not returned by the model (SDPA never materializes them), so a pre-hook on each attention
module recomputes softmax(q k^T / sqrt(d) + mask) from that module's own input with the model's own projections,
rotary and KV-head grouping; the test checks that these weights times V give exactly what SDPA returned.

Attribution (Simonyan et al. 2014; Shrikumar et al. 2017 "gradient x input"): for the log-probability of each
answer token, the gradient with respect to every input embedding dotted with that embedding. It is the first-order
change of the log-probability when a token's embedding is scaled towards zero, so a positive value means the token
made the answer more likely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.errors import UserError


class VizError(UserError):
    """Bad input for a map: empty text, too many tokens to label, a context overflow."""


# Tokens beyond this are unreadable on a heatmap axis at any figure size we write.
MAX_TOKENS = 96


# --- attention -----------------------------------------------------------------------------------------------
def attention_maps(model: Any, ids: Sequence[int]) -> Any:
    """Attention probabilities [layers, heads, S, S] of one sequence (positions 0..S-1, causal)."""
    import torch

    from model.transformer import apply_rotary, packed_causal_mask, repeat_kv

    captured: list[torch.Tensor] = []

    def hook(attn, args):
        x, cos, sin, position_ids = args[:4]
        b, s, _ = x.shape
        # [B, S, H*D] -> [B, H, S, D], as Attention.forward does
        q = attn.q_proj(x).view(b, s, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, s, attn.n_kv, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k = repeat_kv(k, attn.n_heads // attn.n_kv)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)  # [B, H, S, S]
        mask = packed_causal_mask(position_ids)
        if mask is None:
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        captured.append(scores.softmax(-1)[0])

    handles = [layer.self_attn.register_forward_pre_hook(hook) for layer in model.layers]
    try:
        with torch.no_grad():
            model(torch.tensor([list(ids)], device=model.embed_tokens.weight.device))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(captured).cpu()  # [L, H, S, S]


# --- attribution ---------------------------------------------------------------------------------------------
def attribution(model: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> tuple[Any, Any]:
    """Gradient x input of each answer token's log-probability w.r.t. the prompt tokens' embeddings.

    Returns (scores [A, P], logprobs [A]): scores[a, p] = d log p(answer_a | prefix) / d e_p . e_p. Summing the
    rows gives the attribution of the whole answer's log-probability (the gradient is linear)."""
    import torch

    if not prompt_ids or not answer_ids:
        raise VizError("attribution needs a non-empty prompt and a non-empty answer")
    ids = list(prompt_ids) + list(answer_ids)
    p, a = len(prompt_ids), len(answer_ids)
    holder: dict[str, torch.Tensor] = {}

    def hook(_module, _args, out):
        # A leaf we can take gradients to, even though the weights do not require grad.
        holder["emb"] = out.detach().requires_grad_(True)
        return holder["emb"]

    handle = model.embed_tokens.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            device = model.embed_tokens.weight.device
            logits = model(torch.tensor([ids], device=device))[0]  # [S, V]
            # predictions of the answer tokens, in at least float32 (float64 stays float64)
            logp = torch.log_softmax(
                logits[p - 1 : p + a - 1].to(torch.promote_types(logits.dtype, torch.float32)), -1
            )
            chosen = logp[torch.arange(a), torch.tensor(list(answer_ids), device=device)]  # [A]
            emb = holder["emb"]
            rows = []
            for i in range(a):
                (grad,) = torch.autograd.grad(chosen[i], emb, retain_graph=i < a - 1)
                rows.append((grad[0, :p] * emb[0, :p]).sum(-1))  # [P]
    finally:
        handle.remove()
    return torch.stack(rows).detach().cpu(), chosen.detach().cpu()


# --- labels and plots ----------------------------------------------------------------------------------------
def _renderable() -> Any:
    """The set of characters the default matplotlib font draws (DejaVu Sans has no CJK glyphs); others are
    written as \\uXXXX so the PNG never shows empty boxes."""
    import matplotlib.font_manager as fm
    from matplotlib.ft2font import FT2Font

    font = FT2Font(fm.findfont(fm.FontProperties(family="DejaVu Sans")))
    return set(font.get_charmap())


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """One readable label per token: its own bytes (a byte-level token may hold half a UTF-8 character, shown
    as \\xNN), with spaces as a middle dot and newlines as \\n."""
    chars = _renderable()
    labels = []
    for tid in ids:
        text = tokenizer.token_bytes(tid).decode("utf-8", errors="backslashreplace")
        text = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u00b7")
        labels.append("".join(c if ord(c) in chars else f"\\u{ord(c):04x}" for c in text))
    return labels


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attention(maps: Any, labels: Sequence[str], out_dir: Path, title: str = "") -> list[Path]:
    """attention_layer{i}.png: a grid of heads, query tokens down, key tokens across."""
    from tqdm import tqdm

    plt = _pyplot()
    n_layers, n_heads, s, _ = maps.shape
    cols = min(n_heads, 4)
    rows = math.ceil(n_heads / cols)
    cell = max(3.0, 0.16 * s + 1.2)
    paths = []
    for layer in tqdm(range(n_layers), desc="attention maps", unit="layer"):
        fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False)
        for h in range(rows * cols):
            ax = axes[h // cols][h % cols]
            if h >= n_heads:
                ax.axis("off")
                continue
            ax.imshow(maps[layer, h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"head {h}", fontsize=9)
            ax.set_xticks(range(s), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(s), labels, fontsize=6)
        fig.suptitle(f"layer {layer} attention (row: query, column: key){' - ' + title if title else ''}")
        fig.tight_layout()
        path = out_dir / f"attention_layer{layer}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_attribution(
    scores: Any, prompt_labels: Sequence[str], answer_labels: Sequence[str], out: Path
) -> Path:
    """Top: gradient x input per (answer token, prompt token), red = raised the token's probability, blue =
    lowered it. Bottom: the whole answer's attribution per prompt token."""
    import numpy as np

    plt = _pyplot()
    a, p = scores.shape
    arr = scores.numpy()
    # Rows scaled to their own largest |value|: the tokens next to the answer often dwarf the rest, and one
    # shared scale would leave every other row blank. The bar chart below keeps the raw sums.
    norm = arr / np.maximum(np.abs(arr).max(axis=1, keepdims=True), 1e-30)
    width = max(6.0, 0.22 * p + 2)
    fig, (ax, bx) = plt.subplots(
        2, 1, figsize=(width, max(4.0, 0.22 * a + 3)), gridspec_kw={"height_ratios": [max(a, 3), 3]}
    )
    im = ax.imshow(norm, cmap="coolwarm", vmin=-1.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(p), prompt_labels, rotation=90, fontsize=6)
    ax.set_yticks(range(a), answer_labels, fontsize=6)
    ax.set_xlabel("prompt token")
    ax.set_ylabel("answer token")
    ax.set_title("gradient x input, each row scaled to its max |value|", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    total = arr.sum(0)
    bx.bar(range(p), total, color=["tab:red" if v > 0 else "tab:blue" for v in total])
    bx.set_xticks(range(p), prompt_labels, rotation=90, fontsize=6)
    bx.set_xlim(-0.5, p - 0.5)
    bx.set_ylabel("whole answer")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_metrics(metrics_jsonl: str | Path, out: str | Path, title: str = "") -> Path:
    """Training curves from a stage's metrics.jsonl (one JSON object per step: step, loss, lr, grad_norm,
    val_loss on eval steps): loss and validation loss, learning rate, gradient norm. Called by the train loop
    at the end of each stage."""
    import json

    plt = _pyplot()
    rows = []
    with open(metrics_jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                if isinstance(item, dict) and "step" in item:
                    rows.append(item)

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [
            (r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x, y = series("loss")
    axes[0].plot(x, y, lw=0.8, label="train loss")
    x, y = series("val_loss")
    axes[0].plot(x, y, "o-", ms=3, label="val loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend()
    for ax, key, label in ((axes[1], "lr", "learning rate"), (axes[2], "grad_norm", "grad norm (pre-clip)")):
        x, y = series(key)
        ax.plot(x, y, lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    fig.suptitle(title or str(metrics_jsonl))
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --- entry points (the `instructlm viz` verbs) ---------------------------------------------------------------
def _load(checkpoint: str | Path, tokenizer_dir: str | Path | None):
    from model.checkpoint import load_checkpoint, load_config
    from model.tokenizer import Tokenizer
    from training.evaluate import check_tokenizer

    config = load_config(checkpoint)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else Path(checkpoint)
    tokenizer = Tokenizer.load(tok_dir)
    check_tokenizer(tokenizer, config, str(tok_dir))
    return load_checkpoint(checkpoint), tokenizer


def _encode(tokenizer: Any, text: str, chat: bool, what: str) -> list[int]:
    from model.chat import encode_chat

    if not text or not text.strip():
        raise VizError(f"{what} is empty: give the text to look at")
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True).ids
    return tokenizer.encode(text)


def run_attention(
    checkpoint: str | Path,
    text: str,
    out_dir: str | Path,
    chat: bool = False,
    tokenizer_dir: str | Path | None = None,
    max_tokens: int = MAX_TOKENS,
) -> list[Path]:
    model, tokenizer = _load(checkpoint, tokenizer_dir)
    ids = _encode(tokenizer, text, chat, "--text")
    if len(ids) > max_tokens:
        raise VizError(
            f"--text is {len(ids)} tokens; the heatmaps stay readable up to --max-tokens {max_tokens}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    maps = attention_maps(model, ids)
    return plot_attention(maps, token_labels(tokenizer, ids), out_dir, title=f"{len(ids)} tokens")


def run_attribution(
    checkpoint: str | Path,
    prompt: str,
    out_dir: str | Path,
    answer: str | None = None,
    max_new_tokens: int = 24,
    chat: bool = True,
    tokenizer_dir: str | Path | None = None,
    max_tokens: int = MAX_TOKENS,
) -> tuple[Path, str]:
    """Attribute `answer` (or the model's greedy answer) to the prompt; returns the PNG and the answer text."""
    from model.generate import generate

    model, tokenizer = _load(checkpoint, tokenizer_dir)
    prompt_ids = _encode(tokenizer, prompt, chat, "--prompt")
    if answer is not None:
        if not answer.strip():
            raise VizError("--answer is empty: leave it out to attribute the model's own answer")
        answer_ids = tokenizer.encode(answer)
    else:
        if max_new_tokens < 1:
            raise VizError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > model.config.max_position_embeddings:
            raise VizError(
                f"--prompt is {len(prompt_ids)} tokens; with {max_new_tokens} new ones it exceeds the context "
                f"{model.config.max_position_embeddings}"
            )
        out = generate(model, [prompt_ids], max_new_tokens, stop_ids=tokenizer.stop_ids)[0]
        answer_ids = out.tokens
    total = len(prompt_ids) + len(answer_ids)
    if total > model.config.max_position_embeddings:
        raise VizError(
            f"prompt + answer are {total} tokens, over the context {model.config.max_position_embeddings}"
        )
    if len(prompt_ids) > max_tokens or len(answer_ids) > max_tokens:
        raise VizError(
            f"prompt ({len(prompt_ids)}) or answer ({len(answer_ids)}) tokens exceed --max-tokens {max_tokens}"
        )
    scores, _ = attribution(model, prompt_ids, answer_ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = plot_attribution(
        scores,
        token_labels(tokenizer, prompt_ids),
        token_labels(tokenizer, answer_ids),
        out_dir / "attribution.png",
    )
    return path, tokenizer.decode(answer_ids, skip_special_tokens=False)

"""Attention maps and gradient x input attribution on the tiny model, checked against the model's own attention
output and against finite differences; the `instructlm viz` verbs and their bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from instructlm.cli import main
from training.viz import attention_maps, attribution, plot_metrics, token_labels


def test_attention_maps_times_values_reproduce_the_models_attention_output(tiny_model, tiny_tokenizer):
    from model.transformer import repeat_kv

    ids = tiny_tokenizer.encode("Where is the nearest store? 你好")
    maps = attention_maps(tiny_model, ids)
    cfg = tiny_model.config
    assert maps.shape == (cfg.num_hidden_layers, cfg.num_attention_heads, len(ids), len(ids))
    assert torch.allclose(maps.sum(-1), torch.ones(()), atol=1e-6)
    assert torch.all(maps.triu(1) == 0)  # causal
    # Reference: what SDPA returned inside the model (o_proj's input) vs our weights times V.
    seen = {}

    def grab(layer):
        def pre(attn, args):
            x, cos, sin = args[:3]
            v = attn.v_proj(x).view(1, len(ids), attn.n_kv, attn.head_dim).transpose(1, 2)
            seen[layer, "v"] = repeat_kv(v, attn.n_heads // attn.n_kv)

        return pre

    def out(layer):
        return lambda mod, args: seen.__setitem__((layer, "o"), args[0])

    handles = []
    for i, layer in enumerate(tiny_model.layers):
        handles.append(layer.self_attn.register_forward_pre_hook(grab(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(out(i)))
    with torch.no_grad():
        tiny_model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    for i in range(cfg.num_hidden_layers):
        mine = (maps[i] @ seen[i, "v"][0]).transpose(0, 1).reshape(len(ids), -1)  # [S, H*D]
        # float32 softmax(QK)V vs SDPA's fused float32: both ~1e-7 from exact; 1e-5 leaves room.
        assert torch.allclose(mine, seen[i, "o"][0], atol=1e-5), i


def test_gradient_times_input_is_the_derivative_of_scaling_each_prompt_embedding(
    tiny_model, tiny_tokenizer, monkeypatch
):
    from model.transformer import RMSNorm

    # float64 end to end, so central differences are accurate to ~1e-9. RMSNorm normalizes in float32 by design
    # (as transformers does); the reference needs it in the input dtype.
    def rms64(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    monkeypatch.setattr(RMSNorm, "forward", rms64)
    model = copy.deepcopy(tiny_model).double()
    prompt = tiny_tokenizer.encode("How do I reset my password?")
    answer = tiny_tokenizer.encode(" Open the app")
    scores, logprobs = attribution(model, prompt, answer)
    assert scores.shape == (len(answer), len(prompt))

    def total_logprob(j: int, eps: float) -> float:
        def scale(_m, _a, out):
            out = out.clone()
            out[0, j] *= 1 + eps
            return out

        h = model.embed_tokens.register_forward_hook(scale)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer]))[0]
        h.remove()
        lp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
        return float(lp[torch.arange(len(answer)), torch.tensor(answer)].sum())

    assert total_logprob(0, 0.0) == pytest.approx(float(logprobs.sum()), abs=1e-9)
    eps = 1e-5
    for j in range(len(prompt)):
        numeric = (total_logprob(j, eps) - total_logprob(j, -eps)) / (2 * eps)
        assert float(scores[:, j].sum()) == pytest.approx(numeric, abs=1e-6), j


def test_token_labels_show_each_tokens_bytes(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Hi there\n你")
    labels = token_labels(tiny_tokenizer, ids)
    assert len(labels) == len(ids)
    joined = "".join(labels)
    assert "·there" in joined and "\\n" in joined
    # No CJK glyph in the default font: written as an escape (or \x bytes when the token splits the character).
    assert "你" not in joined and ("\\u4f60" in joined or "\\x" in joined)


def test_viz_attention_writes_one_png_per_layer(tiny_checkpoint, tmp_path, capsys):
    import matplotlib.image

    assert (
        main(
            [
                "viz",
                "attention",
                "--checkpoint",
                str(tiny_checkpoint),
                "--text",
                "Hello world",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    pngs = sorted(tmp_path.glob("attention_layer*.png"))
    assert [p.name for p in pngs] == ["attention_layer0.png", "attention_layer1.png"]
    assert matplotlib.image.imread(pngs[0]).shape[0] > 200


def test_viz_attribution_writes_the_map_and_prints_the_answer(tiny_checkpoint, tmp_path, capsys):
    argv = [
        "viz",
        "attribution",
        "--checkpoint",
        str(tiny_checkpoint),
        "--prompt",
        "Reset my password",
        "--max-new-tokens",
        "5",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    assert "answer:" in capsys.readouterr().out
    assert (tmp_path / "attribution.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["attention", "--text", "  "], "--text is empty"),
        (["attribution", "--prompt", ""], "--prompt is empty"),
        (["attribution", "--prompt", "hi", "--answer", " "], "--answer is empty"),
        (["attention", "--text", "word " * 200], "the heatmaps stay readable up to --max-tokens 96"),
    ],
)
def test_viz_bad_input_is_one_clear_line(tiny_checkpoint, tmp_path, capsys, argv, message):
    verb, *rest = argv
    rc = main(["viz", verb, "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), *rest])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))


def test_plot_metrics_draws_the_training_curves(tmp_path):
    lines = [
        {"stage": "sft", "step": i, "loss": 5 - i * 0.1, "lr": 1e-3, "grad_norm": 1.0} for i in range(1, 21)
    ]
    lines[9]["val_loss"] = 4.2
    lines[19]["val_loss"] = float("nan")  # a diverged eval is skipped, not plotted as a gap crash
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "curves.png", title="sft")
    assert out.stat().st_size > 10_000

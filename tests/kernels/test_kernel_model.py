"""End to end: the tiny model with attn_backend="triton" (attention, fused rotary, fused add+RMSNorm) against
"sdpa", under the kernel tolerance rule, for packed training rows (logits and gradients), chunked prefill over
the slot cache and cached decode steps. Plus the backend selection and the import guarantees."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
from kernel_rule import assert_rule

import kernels
from model.cache import KVCache
from model.config import preset
from model.transformer import Transformer


@pytest.fixture(params=[16, 32], ids=["head_dim16", "head_dim32"])
def models(request, device):
    """(float64 sdpa, float32 sdpa, float32 triton) copies of one random tiny model (GQA ratio 2)."""
    config = preset("tiny", hidden_size=4 * request.param, max_position_embeddings=128)
    base = Transformer(config)
    base.init_weights(seed=7)
    ref64 = copy.deepcopy(base).double().to(device)
    sdpa = copy.deepcopy(base).to(device)
    tri = copy.deepcopy(base).to(device)
    tri.set_attn_backend("triton")
    return ref64, sdpa, tri


def test_packed_logits_and_gradients_match_sdpa(models, device):
    ref64, sdpa, tri = models
    gen = torch.Generator().manual_seed(0)
    vocab = ref64.config.vocab_size
    ids = torch.randint(0, vocab, (2, 40), generator=gen).to(device)
    # Row 0: examples of 15 and 20 tokens then 5 padding; row 1: one 40-token example.
    pos = torch.stack(
        [torch.cat([torch.arange(15), torch.arange(20), torch.full((5,), -1)]), torch.arange(40)]
    )
    pos = pos.to(device)
    valid = (pos >= 0)[..., None]
    targets = torch.randint(0, vocab, (2, 40), generator=gen).to(device)

    def run(model):
        logits = model(ids, pos)
        loss = torch.nn.functional.cross_entropy(logits[valid[..., 0]], targets[valid[..., 0]])
        loss.backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    (l64, g64), (l32, g32), (lt, gt) = run(ref64), run(sdpa), run(tri)
    assert_rule("logits", lt, l64, l32, valid)
    for name in g64:
        assert_rule(f"grad {name}", gt[name], g64[name], g32[name])


def test_chunked_prefill_and_decode_match_sdpa(models, device):
    ref64, sdpa, tri = models
    config = ref64.config
    gen = torch.Generator().manual_seed(1)
    caches = [KVCache(config, num_slots=4, max_len=96, dtype=m.rope_cos.dtype, device=device) for m in models]
    slots = torch.tensor([3, 1], device=device)

    def step(ids, pos, name):
        outs = [m(ids, pos, cache=c, slots=slots) for m, c in zip(models, caches, strict=True)]
        assert_rule(name, outs[2], outs[0], outs[1], (pos >= 0)[..., None])

    with torch.no_grad():
        # Chunk 1: rows of 30 and 12 tokens (row 1 right-padded); chunk 2 continues both at their own offsets.
        ids = torch.randint(0, config.vocab_size, (2, 30), generator=gen).to(device)
        pos = torch.stack([torch.arange(30), torch.cat([torch.arange(12), torch.full((18,), -1)])]).to(device)
        step(ids, pos, "prefill chunk 1")
        ids = torch.randint(0, config.vocab_size, (2, 17), generator=gen).to(device)
        pos = torch.stack([torch.arange(30, 47), torch.cat([torch.arange(12, 21), torch.full((8,), -1)])])
        step(ids, pos.to(device), "prefill chunk 2 (cached offset)")
        lengths = caches[0].lengths[slots].clone()
        assert lengths.tolist() == [47, 21]
        for i in range(4):  # decode steps over ragged contexts
            ids = torch.randint(0, config.vocab_size, (2, 1), generator=gen).to(device)
            step(ids, (lengths + i)[:, None], f"decode step {i}")


def test_select_attn_backend_says_which_and_why(caplog):
    with caplog.at_level(logging.INFO, logger="kernels"):
        assert kernels.select_attn_backend("cpu") == "sdpa"
        assert kernels.select_attn_backend("cuda", head_dim=96) == "sdpa"
    assert "attention backend: sdpa" in caplog.text and "need CUDA" in caplog.text
    assert "head_dim 96" in caplog.text
    if torch.cuda.is_available():
        assert kernels.select_attn_backend("cuda") == "triton"


def test_import_kernels_needs_neither_triton_nor_torch():
    """The serving image has no triton (and the ONNX one no torch): `import kernels` must still work."""
    code = (
        "import sys; sys.modules['triton'] = None; import kernels; "
        "assert 'torch' not in sys.modules; assert not kernels.triton_available(); "
        "print(kernels.select_attn_backend('cuda'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sdpa"


def test_model_import_does_not_load_the_kernels():
    """TRITON_INTERPRET must be set before a kernel module is imported, so the model imports them lazily."""
    code = "import sys, model.transformer; assert not [m for m in sys.modules if m.startswith('kernels')]"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    code = (
        "import torch; from kernels.attention import attention_packed\n"
        "q = torch.zeros(1, 2, 4, 32)\n"
        "try:\n    attention_packed(q, q, q, torch.arange(4)[None])\n"
        "except ValueError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "q is on cpu: the Triton kernels need CUDA tensors" in out.stdout


def _compile_check(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "kernel_compile_check.py")
    return subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=1200, env=env
    )


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter never runs the compiler: build every kernel down to an sm_90 cubin (bf16, head dim 128)."""
    out = _compile_check()
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok sm_90") == 9, out.stdout


@pytest.mark.slow
def test_every_config_compiles_for_ampere_and_hopper():
    out = _compile_check("--full", timeout=3600)  # 136 compiles, 2 s to 2 min each
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout

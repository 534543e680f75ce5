"""GGUF files run by llama.cpp itself vs our PyTorch model: greedy agreement, prompt-logit error, tokenizer.

    PYTHONPATH=. python bench/gguf_parity.py --checkpoint runs/demo/checkpoint [--tokens 32]

Exports the checkpoint as f32, f16 and q8_0 GGUF into a temporary directory, then for three chat prompts
prints how many greedy tokens llama.cpp (llama-cpp-python, the optional `bench` extra) produces equal to
`model.generate` before the first difference, and the max |logit difference| over the prompt positions. Also
checks that llama.cpp's tokenizer, driven by the file's vocabulary, splits four texts as ours does.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

QUESTIONS = (
    "How do I reset my password?",
    "Translate to German: Where is the nearest store?",
    "Write a short story about a lost phone.",
)
TEXTS = (
    "Hello! How do I reset my password?",
    "Wo ist der nächste Laden? Grüße aus Berlin!",
    "请把这句话翻译成英文：我的手机丢了。",
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens compared per prompt")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (pip install '.[bench]'): nothing measured.")
        return 0
    import torch

    from export.gguf_export import export_gguf
    from model.chat import encode_chat
    from model.checkpoint import load_checkpoint
    from model.generate import generate
    from model.sampling import GREEDY
    from model.tokenizer import Tokenizer

    torch.set_num_threads(1)
    print(
        f"machine: python {platform.python_version()}, torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}"
    )
    print(f"command: PYTHONPATH=. python bench/gguf_parity.py {shlex.join(sys.argv[1:])}")
    model, tok = load_checkpoint(args.checkpoint), Tokenizer.load(args.checkpoint)
    prompts = [
        encode_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True).ids for q in QUESTIONS
    ]
    ours = [g.tokens for g in generate(model, prompts, args.tokens, GREEDY, stop_ids=())]
    with torch.no_grad():
        ref = [model(torch.tensor([p]))[0].numpy() for p in prompts]
    tmp = Path(tempfile.mkdtemp(prefix="gguf-parity-"))
    print(f"\n| type | prompt tokens | greedy tokens equal (of {args.tokens}) | prompt logits max abs diff |")
    print("|---|---|---|---|")
    for kind in ("f32", "f16", "q8_0"):
        path = tmp / f"model.{kind}.gguf"
        export_gguf(args.checkpoint, path, weight_type=kind)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
        equal, err = [], []
        for p, mine, r in zip(prompts, ours, ref, strict=True):
            theirs = []
            for t in llm.generate(p, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
                theirs.append(t)
                if len(theirs) == args.tokens:
                    break
            equal.append(
                next((i for i, (a, b) in enumerate(zip(theirs, mine, strict=False)) if a != b), args.tokens)
            )
            llm.reset()
            llm.eval(p)
            err.append(float(np.abs(np.array(llm.scores[: len(p)]) - r).max()))
        lens = "/".join(str(len(p)) for p in prompts)
        print(f"| {kind} | {lens} | {'/'.join(map(str, equal))} | {' / '.join(f'{e:.1e}' for e in err)} |")
    llm = llama_cpp.Llama(model_path=str(tmp / "model.f32.gguf"), n_ctx=512, n_threads=1, verbose=False)
    texts = (*TEXTS, "<|im_start|>user\nhi<|im_end|>\n")
    same = [llm.tokenize(t.encode(), add_bos=False, special=True) == tok.encode(t) for t in texts]
    print(
        f"\ntokenizer: llama.cpp splits {sum(same)}/{len(texts)} texts exactly as ours (en, de, zh, ChatML)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The engine stepped by hand: continuous batching checked by the step counter, never by time."""

from __future__ import annotations

import pytest

from model.generate import generate
from model.sampling import GREEDY
from service.engine import Engine, Sequence
from service.runners.base import open_runner

from .test_api import PROMPTS, chat_ids


def make_engine(path, tokenizer, runner="torch", slots=4, budget=64, prefix=0, max_len=0):
    r = open_runner(path, runner, num_slots=slots + prefix, max_len=max_len)
    return Engine(r, tokenizer, max_num_seqs=slots, max_num_batched_tokens=budget, prefix_cache_slots=prefix)


def collect(seq_outputs: dict, key):
    return lambda outs: seq_outputs.setdefault(key, []).extend(outs)


def run_until_done(engine: Engine, limit: int = 2000) -> None:
    for _ in range(limit):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("engine did not finish")


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory, tiny_tokenizer, torch_threads):
    """The tiny shape with a 1,280-token window (the rotary tables follow the config), for a 1,000-token prompt."""
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.transformer import Transformer

    cfg = preset("tiny", vocab_size=tiny_tokenizer.vocab_size, max_position_embeddings=1280)
    model = Transformer(cfg)
    model.init_weights(seed=1)
    root = tmp_path_factory.mktemp("long")
    tiny_tokenizer.save(root / "tok")
    return model.eval(), save_checkpoint(model, root / "ckpt", tokenizer_dir=root / "tok")


@pytest.mark.parametrize("runner", ["torch", "onnx"])
def test_request_arriving_mid_decode_gets_its_first_token_before_the_earlier_one_finishes(
    runner, request, tiny_tokenizer, tiny_model
):
    path = request.getfixturevalue("tiny_bundle" if runner == "onnx" else "tiny_checkpoint")
    engine = make_engine(path, tiny_tokenizer, runner)
    a = Sequence(chat_ids(tiny_tokenizer, PROMPTS[0]), GREEDY, max_tokens=30)
    engine.submit([a])
    for _ in range(5):
        engine.step()
    assert len(a.output) == 5
    b = Sequence(chat_ids(tiny_tokenizer, PROMPTS[1]), GREEDY, max_tokens=30)
    engine.submit([b])
    run_until_done(engine)
    assert b.steps[0] == a.steps[4] + 1, "b was not admitted at the next step"
    assert b.steps[0] < a.steps[-1]
    # Both still produce exactly what a reference greedy run gives.
    ref = generate(tiny_model, [a.prompt, b.prompt], 30, GREEDY, stop_ids=tiny_tokenizer.stop_ids)
    assert a.output == ref[0].tokens and b.output == ref[1].tokens
    assert engine.free_slots and len(engine.free_slots) == 4 and not engine.running
    if runner == "onnx":  # the slot graph ran b's prefill and a's decode row as one forward
        assert engine.mixed_steps >= 1


@pytest.mark.parametrize("runner", ["torch", "onnx"])
def test_long_prompt_is_chunked_and_running_streams_get_a_token_every_step(
    runner, long_checkpoint, tiny_tokenizer, tmp_path
):
    model, path = long_checkpoint
    if runner == "onnx":  # chunks packed with the decode rows into one forward a step (the slot graph)
        from export.onnx_export import export_bundle

        export_bundle(path, tmp_path / "bundle", attention="slot")
        path = tmp_path / "bundle"
    budget = 128
    engine = make_engine(path, tiny_tokenizer, runner, slots=4, budget=budget)
    streams = [Sequence(chat_ids(tiny_tokenizer, p), GREEDY, max_tokens=60) for p in PROMPTS[:3]]
    engine.submit(streams)
    for _ in range(3):
        engine.step()
    long_prompt = (tiny_tokenizer.encode(" ".join(PROMPTS)) * 40)[:1000]
    big = Sequence(long_prompt, GREEDY, max_tokens=4)
    engine.submit([big])
    submitted_at = engine.step_count
    before = engine.prefill_tokens
    run_until_done(engine)
    first = big.steps[0]
    # 1,000 tokens through a 128-token budget shared with 3 decode rows: chunks of 125 -> 8 steps of prefill.
    assert first - submitted_at == -(-1000 // (budget - 3))
    for s in streams:
        during = [st for st in s.steps if submitted_at < st <= first]
        assert during == list(range(submitted_at + 1, first + 1)), "a running stream missed a step"
    assert engine.prefill_tokens - before == 1000
    # Chunked prefill gives what one whole prefill gives.
    ref = generate(model, [long_prompt], 4, GREEDY, stop_ids=tiny_tokenizer.stop_ids)[0]
    assert big.output == ref.tokens
    if runner == "onnx":
        assert engine.mixed_steps >= 8
        refs = generate(model, [s.prompt for s in streams], 60, GREEDY, stop_ids=tiny_tokenizer.stop_ids)
        assert [s.output for s in streams] == [r.tokens for r in refs]


def test_prefix_cache_skips_shared_prefix_and_keeps_output(tiny_checkpoint, tiny_tokenizer, tiny_model):
    engine = make_engine(tiny_checkpoint, tiny_tokenizer, "torch", slots=2, prefix=2)
    system = [{"role": "system", "content": "You are the Kestrel Mobile assistant. " * 3}]
    from model.chat import encode_chat

    p1 = encode_chat(tiny_tokenizer, [*system, {"role": "user", "content": PROMPTS[0]}], True).ids
    p2 = encode_chat(tiny_tokenizer, [*system, {"role": "user", "content": PROMPTS[1]}], True).ids
    a = Sequence(p1, GREEDY, max_tokens=8)
    engine.submit([a])
    run_until_done(engine)
    before = engine.prefill_tokens
    b = Sequence(p2, GREEDY, max_tokens=8)
    engine.submit([b])
    run_until_done(engine)
    shared = next(i for i, (x, y) in enumerate(zip(p1, p2, strict=False)) if x != y)
    assert b.cached_tokens == shared > 16
    assert engine.prefill_tokens - before == len(p2) - shared
    ref = generate(tiny_model, [p2], 8, GREEDY, stop_ids=tiny_tokenizer.stop_ids)[0]
    assert b.output == ref.tokens
    assert engine.metrics.prefix_hits._value.get() == 1


def test_cancel_frees_the_slot_at_the_next_step(tiny_checkpoint, tiny_tokenizer):
    engine = make_engine(tiny_checkpoint, tiny_tokenizer, "torch", slots=2)
    got: dict = {}
    s = Sequence(chat_ids(tiny_tokenizer, PROMPTS[2]), GREEDY, max_tokens=100, deliver=collect(got, 0))
    engine.submit([s])
    for _ in range(3):
        engine.step()
    engine.abort(s)
    engine.step()
    assert s.finish_reason == "abort" and not engine.running and len(engine.free_slots) == 2
    assert got[0][-1].finish_reason == "abort"
    assert engine.metrics.disconnects._value.get() == 1


def test_request_past_its_timeout_is_cut_and_counted(tiny_checkpoint, tiny_tokenizer):
    engine = make_engine(tiny_checkpoint, tiny_tokenizer, "torch", slots=2)
    got: dict = {}
    s = Sequence(
        chat_ids(tiny_tokenizer, PROMPTS[3]), GREEDY, max_tokens=100, timeout_s=5.0, deliver=collect(got, 0)
    )
    engine.submit([s])
    for _ in range(3):
        engine.step()
    s.arrival -= 10.0  # its 5 s have passed (the clock is the engine's; no sleeping in tests)
    engine.step()
    assert s.finish_reason == "length" and len(s.output) == 3 and not engine.running
    assert got[0][-1].finish_reason == "length" and got[0][-1].completion_tokens == 3
    assert engine.metrics.failure.labels(reason="timeout")._value.get() == 1


def test_a_freed_slot_is_the_next_one_given_out(tiny_checkpoint, tiny_tokenizer):
    """Slots are reused most-recently-freed first, so a lightly loaded server keeps using the slots whose cache
    rows are warm instead of cycling through all of them."""
    engine = make_engine(tiny_checkpoint, tiny_tokenizer, "torch", slots=4)
    a = Sequence(chat_ids(tiny_tokenizer, PROMPTS[0]), GREEDY, max_tokens=3, ignore_eos=True)
    b = Sequence(chat_ids(tiny_tokenizer, PROMPTS[1]), GREEDY, max_tokens=6, ignore_eos=True)
    engine.submit([a, b])
    engine.step()
    assert (a.slot, b.slot) == (0, 1)
    run_until_done(engine)  # a ends first, then b
    c = Sequence(chat_ids(tiny_tokenizer, PROMPTS[2]), GREEDY, max_tokens=2, ignore_eos=True)
    engine.submit([c])
    engine.step()
    assert c.slot == b.slot  # the last one freed, not slot 2 that has never been used

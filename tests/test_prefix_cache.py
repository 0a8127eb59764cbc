"""Prefix reuse: a request keeps the KV of the longest prefix its prompt shares with the last
request's prompt and output, and prefills only the rest. In bf16 exact numerics what it emits,
tokens and log probabilities, is bit for bit what a fresh cache gives, for every method,
greedy and sampled."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import SetAfter, make_runtime, minimum_budget

from subspec.config import SamplingConfig, SpecConfig
from subspec.model.tokenizer import encode_messages
from subspec.runtime.generate import stream_generate
from subspec.runtime.runtime import Request
from subspec.speculative.decoding import Cancelled

SPEC = SpecConfig(depth=4, width=2, draft_temperature=0.5)
METHODS = ("vanilla", "subspec")
GREEDY = SamplingConfig()
SAMPLINGS = [GREEDY, SamplingConfig(temperature=0.8, top_p=0.95, seed=3)]


@pytest.fixture(scope="module")
def runtimes(tiny_model_dir):
    """(with reuse, without) on the tiny model in bf16 exact numerics, its layers streaming."""
    budget = minimum_budget(tiny_model_dir, METHODS, "bfloat16", SPEC)
    pair = [make_runtime(tiny_model_dir, METHODS, budget, "bfloat16", SPEC, numerics="exact",
                         prefix_cache=reuse) for reuse in (True, False)]  # fmt: skip
    assert pair[0].placement.streams
    yield pair
    for runtime in pair:
        runtime.close()


def run(runtime, method: str, prompt: list[int], sampling=GREEDY, max_new=16,
        cancelled=None):  # fmt: skip
    """(tokens, their log probabilities with the top 3, the final stats) of one request."""
    tokens, logprobs, stats = [], [], None
    request = Request(prompt, method, max_new, sampling, logprobs=3, cancelled=cancelled)
    for ev in stream_generate(runtime, request):
        tokens.extend(ev.token_ids)
        logprobs.extend((e.token, e.logprob, e.top) for e in ev.logprobs)
        stats = ev.stats or stats
    return tokens, logprobs, stats


def chat_ids(runtime, *turns: str) -> list[int]:
    """A conversation's prompt ids: user, assistant, user, ... ready for the next reply."""
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return encode_messages(runtime.tokenizer, messages)


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
@pytest.mark.parametrize("method", METHODS)
def test_next_turn_reuses_the_conversation_and_emits_a_fresh_runs_bits(runtimes, method,
                                                                         sampling):  # fmt: skip
    reuse, fresh = runtimes
    run(reuse, "vanilla", chat_ids(reuse, "something else first"))
    first = chat_ids(reuse, "hello world")
    reply, _, _ = run(reuse, method, first, sampling)
    text = reuse.tokenizer.decode(reply, skip_special_tokens=True)
    second = chat_ids(reuse, "hello world", text, "the cat sat on the mat")
    assert second[: len(first)] == first
    got = run(reuse, method, second, sampling)
    want = run(fresh, method, second, sampling)
    assert got[:2] == want[:2]  # tokens, log probabilities and top alternatives, bit for bit
    assert len(first) <= got[2].cached_prompt_tokens < len(second)
    assert want[2].cached_prompt_tokens == 0


@pytest.mark.parametrize("method", METHODS)
def test_a_repeated_or_shorter_prompt_keeps_all_it_can(runtimes, method):
    reuse, fresh = runtimes
    long = chat_ids(reuse, "the tiny tokenizer is a test of the world", "hello", "again")
    short = chat_ids(reuse, "the tiny tokenizer is a test of the world")
    assert long[: len(short) - 1] == short[:-1]
    for prompt, kept in ((long, 0), (long, len(long) - 1), (short, None)):
        got = run(reuse, method, prompt)
        assert got[:2] == run(fresh, method, prompt)[:2]
        if kept is not None:
            assert got[2].cached_prompt_tokens >= kept
    assert got[2].cached_prompt_tokens >= len(short) - 1  # trimmed back to the shared prefix


def test_a_prefill_cancelled_midway_leaves_its_finished_chunks(runtimes):
    """Chunks that ran before a cancel stay in the cache; the same prompt next time prefills
    only the rest, and emits what a fresh cache gives."""
    reuse, fresh = runtimes
    original = reuse.cfg
    reuse.cfg = dataclasses.replace(original, prefill_chunk=8)
    try:
        run(reuse, "vanilla", [7] * 3)  # a cache holding nothing of the prompt below
        prompt = list(range(5, 45))  # 40 tokens: 5 chunks of 8
        with pytest.raises(Cancelled):
            run(reuse, "subspec", prompt, cancelled=SetAfter(2))
        got = run(reuse, "subspec", prompt)
    finally:
        reuse.cfg = original
    assert got[2].cached_prompt_tokens == 16
    assert got[:2] == run(fresh, "subspec", prompt)[:2]


def test_prefix_cache_off_prefills_every_prompt_whole(runtimes):
    _, fresh = runtimes
    prompt = chat_ids(fresh, "hello world")
    run(fresh, "vanilla", prompt)
    assert run(fresh, "vanilla", prompt)[2].cached_prompt_tokens == 0

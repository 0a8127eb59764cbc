"""Log probabilities through the official `openai` client: in bf16 exact numerics, vanilla
decoding and speculation emit the same tokens with the same bits of log probability and the
same top alternatives, streamed or not, on chat and legacy completions; each greedy token is
its own top-1, and the log probabilities are the target's own distribution."""

from __future__ import annotations

import math

import openai
import pytest
from helpers import make_runtime, minimum_budget
from live_server import LiveServer

from subspec.app.server import create_app
from subspec.config import SpecConfig
from subspec.model.tokenizer import token_bytes
from subspec.speculative.decoding import prefill

SPEC = SpecConfig(depth=4, width=2, draft_temperature=0.5)
HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def runtime(tiny_model_dir):
    """vanilla and subspec on the tiny model in bf16 exact numerics, its layers streaming."""
    methods = ("vanilla", "subspec")
    budget = minimum_budget(tiny_model_dir, methods, "bfloat16", SPEC)
    rt = make_runtime(tiny_model_dir, methods, budget, "bfloat16", SPEC, numerics="exact")
    assert rt.placement.streams
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def clients(runtime):
    """{method: an openai client of a server decoding with it}, both over `runtime`."""
    vanilla, subspec = create_app(runtime, "vanilla"), create_app(runtime, "subspec")
    with LiveServer(vanilla) as v, LiveServer(subspec) as s:
        yield {m: openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=60)
               for m, srv in (("vanilla", v), ("subspec", s))}  # fmt: skip


def chat_logprobs(client, stream: bool, **kw) -> list[tuple]:
    """[(token, logprob, bytes, [(top token, logprob, bytes)])] of a greedy chat reply."""
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=HELLO,
        max_tokens=20, temperature=0, logprobs=True, top_logprobs=5, stream=stream, **kw,
    )  # fmt: skip
    choices = [c.choices[0] for c in reply if c.choices] if stream else reply.choices
    content = [e for c in choices if c.logprobs for e in c.logprobs.content]
    return [(e.token, e.logprob, e.bytes, [(t.token, t.logprob, t.bytes) for t in e.top_logprobs])
            for e in content]  # fmt: skip


def completion_logprobs(client, stream: bool) -> tuple[list, list, list, list]:
    """(tokens, token_logprobs, top_logprobs, text_offset) of a greedy completion."""
    reply = client.completions.create(
        model=client.models.list().data[0].id, prompt="the cat sat on", max_tokens=20,
        temperature=0, logprobs=4, stream=stream,
    )  # fmt: skip
    parts = (
        [c.choices[0].logprobs for c in reply if c.choices[0].logprobs]
        if stream
        else [reply.choices[0].logprobs]
    )
    return tuple([x for p in parts for x in getattr(p, k)]
                 for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"))  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_logprobs_are_the_same_bits_for_vanilla_and_speculation(clients, stream):
    vanilla = chat_logprobs(clients["vanilla"], stream)
    speculated = chat_logprobs(clients["subspec"], stream)
    assert len(vanilla) > 4
    assert speculated == vanilla  # floats compared exactly
    for token, logprob, _, top in vanilla:
        assert len(top) == 5 and top[0][0] == token and top[0][1] == logprob
        assert [t[1] for t in top] == sorted((t[1] for t in top), reverse=True)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_logprobs_are_the_same_bits_for_vanilla_and_speculation(clients, stream):
    vanilla = completion_logprobs(clients["vanilla"], stream)
    assert completion_logprobs(clients["subspec"], stream) == vanilla
    tokens, logprobs, tops, offsets = vanilla
    assert len(tokens) == len(logprobs) == len(tops) == len(offsets) > 4
    assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    for token, logprob, top in zip(tokens, logprobs, tops, strict=True):
        assert max(top.values()) == logprob == top[token] and len(top) <= 4


def test_streamed_chat_logprobs_equal_the_whole_reply(clients):
    assert chat_logprobs(clients["subspec"], True) == chat_logprobs(clients["subspec"], False)


def test_logprobs_are_the_targets_log_softmax(runtime, clients):
    """The first token's log probabilities are log_softmax of the prompt's last logits."""
    ids = runtime.encode_prompt("hello world", chat=True)
    runtime.start([0])  # an empty cache
    expected = prefill(runtime.target, ids, 512).float().log_softmax(-1)
    token, logprob, _, top = chat_logprobs(clients["vanilla"], False)[0]
    top_ids = expected.topk(5).indices.tolist()
    assert logprob == expected[top_ids[0]].item()
    assert [t[1] for t in top] == expected.topk(5).values.tolist()
    assert math.isclose(sum(math.exp(x) for x in expected.tolist()), 1.0, rel_tol=1e-4)
    assert token == runtime.tokenizer.decode([top_ids[0]])


def test_bytes_spell_each_token(runtime):
    tok = runtime.tokenizer
    ids = tok("héllo wörld\n")["input_ids"]
    assert b"".join(token_bytes(tok, i) for i in ids) == "héllo wörld\n".encode()


@pytest.mark.parametrize("extra", [{"top_logprobs": 21, "logprobs": True}, {"top_logprobs": 2},
                                   {"top_logprobs": -1, "logprobs": True}])  # fmt: skip
def test_bad_logprob_requests_get_400(clients, extra):
    with pytest.raises(openai.BadRequestError) as err:
        client = clients["subspec"]
        client.chat.completions.create(model=client.models.list().data[0].id, messages=HELLO,
                                       **extra)  # fmt: skip
    assert "logprobs" in str(err.value)


def test_usage_reports_the_cached_prompt_tokens(clients):
    client = clients["vanilla"]
    model = client.models.list().data[0].id
    first = client.chat.completions.create(model=model, messages=HELLO, max_tokens=4)
    turn = [*HELLO, {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "again"}]  # fmt: skip
    second = client.chat.completions.create(model=model, messages=turn, max_tokens=4)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens


def test_logprobs_follow_the_tokens_a_stop_string_keeps(clients):
    client = clients["subspec"]
    model = client.models.list().data[0].id
    whole = client.chat.completions.create(model=model, messages=HELLO, max_tokens=20)
    text = whole.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=20,
                                           stop=[stop], logprobs=True)  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens

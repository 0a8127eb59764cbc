"""The server under the official `openai` client, on loopback: streaming equals non-streaming,
many concurrent streams are served in arrival order, a client that leaves frees the runtime at
once, limits and usage are exact under speculation, and every refusal has OpenAI's shape."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from helpers import REPLY, FakeRuntime, make_runtime
from live_server import LiveServer

from subspec.app.server import create_app
from subspec.config import SpecConfig
from subspec.errors import SubspecError
from subspec.runtime.generate import TextStream

HELLO = [{"role": "user", "content": "hello world"}]


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=30)


def streamed_text(stream) -> tuple[str, str | None]:
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


@pytest.fixture(scope="module")
def streaming_runtime(tiny_model_dir):
    """vanilla and subspec on the tiny model, under a budget that makes layers stream."""
    spec = SpecConfig(depth=4, width=2, draft_temperature=0.5)
    with pytest.raises(SubspecError) as err:
        make_runtime(tiny_model_dir, ("vanilla", "subspec"), budget=1, spec=spec)
    minimum = int(str(err.value).split("(")[1].split(" bytes")[0])
    runtime = make_runtime(tiny_model_dir, ("vanilla", "subspec"), minimum, spec=spec)
    assert runtime.placement.streams
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def spec_server(streaming_runtime):
    with LiveServer(create_app(streaming_runtime, "subspec")) as server:
        yield server


def test_streaming_equals_non_streaming(spec_server):
    c = client(spec_server)
    model = c.models.list().data[0].id
    plain = c.chat.completions.create(model=model, messages=HELLO, max_tokens=12)
    stream = c.chat.completions.create(model=model, messages=HELLO, max_tokens=12, stream=True)
    text, finish = streamed_text(stream)
    assert text == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert c.models.retrieve(model).id == model


def _reference(runtime, max_new: int) -> list[int]:
    from helpers import generate

    return generate(runtime, "vanilla", "hello world", max_new)[0]


@pytest.mark.parametrize("max_tokens", [1, 5, 24])
def test_exact_max_tokens_and_usage_under_speculation(spec_server, streaming_runtime, max_tokens):
    reference = _reference(streaming_runtime, max_tokens)
    eos = reference[-1] in streaming_runtime.eos_ids
    reply = client(spec_server).chat.completions.create(
        model=streaming_runtime.cfg.model, messages=HELLO,
        max_tokens=max_tokens, temperature=0,
    )  # fmt: skip
    assert reply.usage.completion_tokens == len(reference) <= max_tokens
    assert reply.choices[0].finish_reason == ("stop" if eos else "length")
    assert reply.choices[0].message.content == streaming_runtime.tokenizer.decode(
        reference, skip_special_tokens=True
    )


def test_stop_string_cuts_text_and_usage(spec_server, streaming_runtime):
    reference = _reference(streaming_runtime, 24)
    full = streaming_runtime.tokenizer.decode(reference, skip_special_tokens=True)
    at = len(full) // 2
    stop = full[at : at + 3]
    at = full.find(stop)
    text = TextStream(streaming_runtime.tokenizer)
    text.add(reference)
    expected_tokens = text.tokens_before(at)
    c = client(spec_server)
    for stream in (False, True):
        reply = c.chat.completions.create(
            model=streaming_runtime.cfg.model, messages=HELLO, max_tokens=24, stop=[stop],
            stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}),
        )  # fmt: skip
        if stream:
            chunks = list(reply)
            got = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            usage = chunks[-1].usage
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
        else:
            choice = reply.choices[0]
            got, usage, finish = choice.message.content, reply.usage, choice.finish_reason
        assert got == full[:at]
        assert finish == "stop"
        assert usage.completion_tokens == expected_tokens < len(reference)


def test_many_concurrent_streams_served_in_arrival_order():
    """More streams than a thread pool's 40 workers; each request waits its turn. The runtime
    is held until all have arrived, and each is sent once the one before it is queued: the
    arrival order is definite without relying on timing."""
    n = 48
    gate = threading.Event()
    engine = FakeRuntime(context=128, gate=gate)
    results: dict[int, str] = {}
    with LiveServer(create_app(engine, "vanilla", max_queue=n)) as server:
        c = client(server)

        def ask(i: int) -> None:
            messages = [{"role": "user", "content": " ".join(["hello"] * (i + 1))}]
            stream = c.chat.completions.create(model="tiny-fake", messages=messages, stream=True)
            results[i] = streamed_text(stream)[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
        for i, t in enumerate(threads):
            t.start()
            assert _settles(server, lambda h, i=i: int(h["busy"]) + h["queued"] == i + 1, 30)
        health = httpx.get(server.url.replace("/v1", "/health"), timeout=5).json()
        gate.set()
        for t in threads:
            t.join(30)
    assert set(health) >= {"busy", "queued", "model", "method"}
    assert results == {i: " ".join(REPLY) for i in range(n)}  # all served, none mixed
    lengths = [p.count(engine.tokenizer.convert_tokens_to_ids("hello")) for p in engine.prompts]
    assert lengths == list(range(1, n + 1))  # first come, first served
    assert engine.max_active == 1


def test_a_client_that_leaves_mid_stream_frees_the_runtime_at_once():
    # ~15 s for the whole reply: a loaded machine still notices the client leave long before
    engine = FakeRuntime(reply=REPLY * 100, context=256, delay=0.05)
    with LiveServer(create_app(engine, "vanilla")) as server:
        c = client(server)
        stream = c.chat.completions.create(model="tiny-fake", messages=HELLO, stream=True)
        next(iter(stream))
        stream.close()  # the client stops reading and goes away
        reply = c.chat.completions.create(model="tiny-fake", messages=HELLO, max_tokens=2)
        assert reply.choices[0].message.content == "the cat"
    # the first decode was stopped, not run to its end before the second was served
    assert engine.emitted[0] < len(engine.script) and len(engine.emitted) == 2


def test_a_queued_client_that_leaves_is_dropped_and_a_full_queue_is_503():
    engine = FakeRuntime(reply=REPLY * 10, context=256, delay=0.05)
    with LiveServer(create_app(engine, "vanilla", max_queue=1)) as server:
        c = client(server)
        first = c.chat.completions.create(model="tiny-fake", messages=HELLO, stream=True)
        next(iter(first))  # the first job is running
        waiting = c.chat.completions.create(
            model="tiny-fake", messages=[{"role": "user", "content": "hello hello"}], stream=True
        )  # queued: its response headers are sent while it waits
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="tiny-fake", messages=HELLO)
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"]
        assert err.value.body["code"] == "queue_full"
        waiting.close()
        first.close()
        assert _settles(server, lambda h: h["queued"] == 0 and not h["busy"])
        reply = c.chat.completions.create(model="tiny-fake", messages=HELLO, max_tokens=2)
        assert reply.choices[0].finish_reason == "length"
    assert len(engine.prompts) == 2  # the one that left while queued never ran


def _settles(server: LiveServer, ok, within: float = 2.0) -> bool:
    """Whether /health satisfies `ok` within `within` seconds (disconnects are noticed on the
    next send or poll, every DISCONNECT_POLL_S)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if ok(httpx.get(server.url.replace("/v1", "/health"), timeout=5).json()):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def fake_server():
    with LiveServer(create_app(FakeRuntime(), "vanilla", max_request_bytes=10_000)) as server:
        yield server


REFUSALS = [
    ({"temperature": 2.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"extra_body": {"top_k": -1}}, 400, "top_k"),
    ({"n": 2}, 400, "n"),
    ({"top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"stop": [""]}, 400, "stop"),
    ({"model": "gpt-4o"}, 404, "gpt-4o"),
    ({"messages": [{"role": "user", "content": "hello " * 5000}]}, 413, "limit"),
]


@pytest.mark.parametrize("fields, status, needle", REFUSALS)
def test_refusals_have_openai_shape(fake_server, fields, status, needle):
    request = {"model": "tiny-fake", "messages": HELLO, **fields}
    with pytest.raises(openai.APIStatusError) as err:
        client(fake_server).chat.completions.create(**request)
    assert err.value.status_code == status
    body = err.value.body
    assert set(body) == {"message", "type", "param", "code"} and needle in body["message"]
    if status == 404:
        assert body["code"] == "model_not_found"


def test_unknown_model_card_is_404(fake_server):
    with pytest.raises(openai.NotFoundError):
        client(fake_server).models.retrieve("gpt-4o")

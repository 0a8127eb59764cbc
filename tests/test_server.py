"""The OpenAI-compatible server, over a fake runtime that replays a fixed token script (the real
stream_generate runs on top of it), plus one end-to-end test on the tiny random model."""

import json
import threading

import pytest
from fastapi.testclient import TestClient
from helpers import REPLY, FakeRuntime, make_runtime, minimum_budget, tiny_tokenizer

from subspec.app.server import create_app
from subspec.errors import SubspecError
from subspec.model.tokenizer import encode_messages
from subspec.offload.stores import DiskStore
from subspec.runtime.generate import stream_generate
from subspec.runtime.runtime import Request


def client_for(engine=None, method="subspec") -> TestClient:
    return TestClient(create_app(engine or FakeRuntime(), method))


def sse_payloads(response) -> list:
    """The data fields of a server-sent event stream, JSON-decoded except [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


CHAT = {"messages": [{"role": "user", "content": "hello world"}]}


def test_models_and_health():
    client = client_for()
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny-fake"]
    assert client.get("/health").json() == {
        "status": "ok",
        "model": "tiny-fake",
        "method": "subspec",
        "busy": False,
        "queued": 0,
    }


def test_chat_completion_shape():
    engine = FakeRuntime()
    body = client_for(engine).post("/v1/chat/completions", json=CHAT).json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and body["model"] == "tiny-fake"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": " ".join(REPLY)}
    assert choice["finish_reason"] == "stop"
    prompt_len = len(encode_messages(engine.tokenizer, CHAT["messages"]))
    assert engine.prompts == [encode_messages(engine.tokenizer, CHAT["messages"])]
    assert body["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": len(REPLY) + 1,  # the EOS counts
        "total_tokens": prompt_len + len(REPLY) + 1,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    stats = body["subspec"]
    assert stats["method"] == "subspec" and stats["tau"] == pytest.approx(len(REPLY) / 4)
    assert "decode_tokens_per_s" in stats and "accept_lengths" not in stats


def test_chat_stream_concatenates_to_the_non_streamed_text():
    client = client_for()
    plain = client.post("/v1/chat/completions", json=CHAT).json()
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    payloads = sse_payloads(client.post("/v1/chat/completions", json=request))
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_text_completion_plain_and_streamed():
    client = client_for()
    request = {"prompt": "the dog ran", "max_tokens": 3}
    plain = client.post("/v1/completions", json=request).json()
    assert plain["object"] == "text_completion"
    assert plain["choices"][0]["text"] == "the cat sat"
    assert plain["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["prompt_tokens"] == 3 and plain["usage"]["completion_tokens"] == 3
    payloads = sse_payloads(client.post("/v1/completions", json={**request, "stream": True}))
    assert payloads[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in payloads[:-1]) == "the cat sat"
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "stop, text", [("mat", "the cat sat on the "), (["mat", "on"], "the cat sat ")]
)
def test_stop_strings(stop, text):
    body = client_for().post("/v1/chat/completions", json={**CHAT, "stop": stop}).json()
    assert body["choices"][0]["message"]["content"] == text
    assert body["choices"][0]["finish_reason"] == "stop"


BAD_CHAT = [
    {**CHAT, "temperature": -1},
    {**CHAT, "top_p": 0},
    {**CHAT, "top_k": -3},
    {**CHAT, "max_tokens": 0},
    {**CHAT, "max_tokens": 1000},  # prompt + max tokens exceed the context of 64
    {**CHAT, "n": 2},
    {**CHAT, "stop": [""]},
    {**CHAT, "stream": True, "temperature": -1},
    {"messages": []},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": " ".join(["hello"] * 80)}]},
    {},
]


@pytest.mark.parametrize("request_body", BAD_CHAT)
def test_bad_chat_requests_are_400(request_body):
    response = client_for().post("/v1/chat/completions", json=request_body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize(
    "request_body", [{"prompt": ""}, {"prompt": "a", "top_p": 2}, {"prompt": 3}, {"prompt": None}]
)
def test_bad_completion_requests_are_400(request_body):
    response = client_for().post("/v1/completions", json=request_body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_and_missing_template_are_400():
    client = client_for(FakeRuntime(tokenizer=tiny_tokenizer(chat_template=None)))
    response = client.post("/v1/chat/completions", content=b"{not json", headers={
        "content-type": "application/json"})  # fmt: skip
    assert response.status_code == 400
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 400
    assert "chat template" in response.json()["error"]["message"]


def test_unknown_route_is_an_openai_style_404():
    response = client_for().get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_concurrent_requests_decode_one_at_a_time():
    engine = FakeRuntime(delay=0.01)
    client = client_for(engine)
    results = []

    def post(stream):
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        results.append(response.status_code)

    threads = [threading.Thread(target=post, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4
    assert len(engine.prompts) == 4 and engine.max_active == 1


def test_end_to_end_on_the_tiny_model(tiny_model_dir):
    runtime = make_runtime(tiny_model_dir, ("vanilla", "subspec"), context=512)  # its maximum
    client = client_for(runtime, "subspec")
    request_body = {**CHAT, "max_tokens": 8}
    plain = client.post("/v1/chat/completions", json=request_body).json()
    assert plain["usage"]["completion_tokens"] >= 1
    assert plain["subspec"]["method"] == "subspec" and "tau" in plain["subspec"]
    payloads = sse_payloads(
        client.post("/v1/chat/completions", json={**request_body, "stream": True})
    )
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in payloads[:-1])
    assert text == plain["choices"][0]["message"]["content"]
    too_long = {**CHAT, "max_tokens": runtime.cfg.context}
    assert client.post("/v1/chat/completions", json=too_long).status_code == 400


def test_server_caps_a_request_that_names_no_max_tokens():
    """Without max_tokens a request would hold the only worker to the end of the context."""
    engine = FakeRuntime(reply=list("abcdefghijklmnopqrstuvwxyz" * 4), context=4096)
    client = TestClient(create_app(engine, "vanilla", max_tokens=5))
    body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == (
        "length"
    )
    named = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 12}).json()
    assert named["usage"]["completion_tokens"] == 12  # a request's own max_tokens wins


def test_at_most_four_stop_strings():
    client = client_for()
    ok = client.post("/v1/chat/completions", json={**CHAT, "stop": ["a", "b", "c", "d"]})
    assert ok.status_code == 200
    refused = client.post("/v1/chat/completions", json={**CHAT, "stop": list("abcde")})
    assert refused.status_code == 400 and "at most 4 stop strings" in refused.text


class FailingRuntime(FakeRuntime):
    def decode(self, request, gen, stats):
        raise OSError("read error in /secret/offload/layer_00003.bin")


def test_a_runtime_failure_is_a_500_without_internals():
    client = TestClient(create_app(FailingRuntime(), "vanilla"), raise_server_exceptions=False)
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500
    body = response.json()["error"]
    assert body["type"] == "server_error" and "incident" in body["message"]
    assert "secret" not in response.text and "OSError" not in response.text
    assert client.get("/health").status_code == 200  # the server keeps serving


class BrokenRuntime(FakeRuntime):
    def unavailable(self):
        return "a read failed: [Errno 5] Input/output error"


def test_health_is_503_while_the_runtime_cannot_serve():
    client = TestClient(create_app(BrokenRuntime(), "vanilla"))
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable" and "read failed" in response.json()["reason"]


def test_a_failed_read_makes_the_runtime_unavailable_until_the_next_request(
    tiny_model_dir, monkeypatch
):
    budget = minimum_budget(tiny_model_dir, ("vanilla",))
    runtime = make_runtime(tiny_model_dir, budget=budget)
    assert runtime.placement.streams and runtime.unavailable() is None

    def failing_read(self, unit, dst, stream=None):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(DiskStore, "read_into", failing_read)
    ids = runtime.encode_prompt("hello world", chat=False)
    with pytest.raises(SubspecError, match="prefetch reader failed"):
        list(stream_generate(runtime, Request(ids, "vanilla", 4)))
    assert "read failed" in runtime.unavailable()
    monkeypatch.undo()  # the disk works again: the next request reads anew and is served

    def tokens(rt) -> list[int]:
        return [t for ev in stream_generate(rt, Request(ids, "vanilla", 4)) for t in ev.token_ids]

    assert tokens(runtime) == tokens(make_runtime(tiny_model_dir))  # all resident
    assert runtime.unavailable() is None
    runtime.close()
    assert runtime.unavailable() is not None

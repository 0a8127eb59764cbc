"""An OpenAI-compatible HTTP server over one runtime.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with
`stream` as server-sent events) and `GET /health`. The runtime decodes one request at a time;
concurrent requests wait on a lock. Bad requests get HTTP 400 with an OpenAI-style error body.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from subspec.config import SamplingConfig, default_method
from subspec.errors import SubspecError
from subspec.model.tokenizer import encode, encode_messages
from subspec.runtime.generate import Event, stream_generate
from subspec.runtime.runtime import Request

HIDDEN_STATS = ("accept_lengths", "placement")  # too bulky for every response


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: str
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        text = self.content
        if isinstance(text, list):
            text = "".join(p.text for p in text)
        return {"role": self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields both completion endpoints share; unknown OpenAI fields are ignored."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension to the OpenAI API
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingRequest):
    prompt: str


@dataclass(frozen=True)
class Job:
    """One validated generation request."""

    request: Request
    include_usage: bool


class Runner:
    """The runtime behind a lock: one generation at a time."""

    def __init__(self, runtime, method: str):
        self.runtime, self.method = runtime, method
        self.lock = threading.Lock()

    def job(self, req: SamplingRequest, prompt_ids: list[int]) -> Job:
        """Validate a request against the runtime; raises SubspecError for a bad one.

        Defaults when the request leaves a field out: temperature 0 (greedy), top_p 1, top_k 0
        (off), a random seed, and max tokens = the rest of the context.
        """
        room = self.runtime.cfg.context - len(prompt_ids)
        max_new = req.max_completion_tokens or req.max_tokens or max(room, 1)
        sampling = SamplingConfig(
            temperature=0.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=random.randrange(2**63) if req.seed is None else req.seed,
        )
        request = Request(prompt_ids, self.method, max_new, sampling, _stops(req.stop))
        self.runtime.check(len(prompt_ids), max_new, self.method)
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return Job(request, usage)

    def events(self, job: Job) -> Iterator[Event]:
        """The generation's events, holding the runtime until they end or are abandoned."""
        with self.lock:
            with closing(stream_generate(self.runtime, job.request)) as gen:
                yield from gen

    def complete(self, job: Job) -> tuple[str, Event]:
        """Run a job to the end: the whole text and the final event."""
        pieces, final = [], None
        for ev in self.events(job):
            pieces.append(ev.text)
            final = ev
        return "".join(pieces), final


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if any(not s for s in stops):
        raise SubspecError("stop strings must not be empty")
    return tuple(stops)


def _chat_prompt(runtime, messages: list[Message]) -> list[int]:
    try:
        return encode_messages(runtime.tokenizer, [m.as_dict() for m in messages])
    except (TemplateError, ValueError) as e:  # a template's raise_exception, or no template
        raise SubspecError(f"cannot apply the chat template: {e}") from None


def _usage(final: Event) -> dict:
    prompt, completion = final.stats.prompt_tokens, final.stats.new_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _subspec(final: Event) -> dict:
    return {k: v for k, v in final.stats.to_dict().items() if k not in HIDDEN_STATS}


def _finish(final: Event) -> str:
    return final.finish_reason or "length"  # the decoder ran out of cache


def _chat_choice(text: str | None, reason: str | None) -> dict:
    delta = {} if text is None else {"content": text}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}


def _text_choice(text: str | None, reason: str | None) -> dict:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _error_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _stream(
    runner: Runner, job: Job, base: dict, choice: Callable, head: tuple[dict, ...] = ()
) -> Iterator[str]:
    """Server-sent events: `head` choices, one chunk per text delta, the finish, [DONE]."""
    for c in head:
        yield _sse({**base, "choices": [c]})
    final = None
    try:
        for ev in runner.events(job):
            if ev.text:
                yield _sse({**base, "choices": [choice(ev.text, None)]})
            final = ev
    except SubspecError as e:
        yield _sse(_error_body(str(e)))
        yield _sse("[DONE]")
        return
    finish = {**base, "choices": [choice(None, _finish(final))], "subspec": _subspec(final)}
    yield _sse(finish)
    if job.include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(final)})
    yield _sse("[DONE]")


def _base(prefix: str, obj: str, model: str) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
    }


def _sse_response(events: Iterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream")


def _validation_message(error: dict) -> str:
    if error["type"] == "json_invalid":
        return f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}"
    return f"{'.'.join(str(x) for x in error['loc'][1:]) or 'body'}: {error['msg']}"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SubspecError)
    def bad_request(request, exc: SubspecError) -> JSONResponse:
        return JSONResponse(_error_body(str(exc)), status_code=400)

    @app.exception_handler(RequestValidationError)
    def invalid(request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(_validation_message(e) for e in exc.errors())
        return JSONResponse(_error_body(message), status_code=400)

    @app.exception_handler(HTTPException)
    def http_error(request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(_error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    def crash(request, exc: Exception) -> JSONResponse:
        return JSONResponse(_error_body(f"internal error: {exc!r}", "server_error"), 500)


def create_app(runtime, method: str) -> FastAPI:
    """The FastAPI app serving `runtime` with decoding `method`.

    Sampling fields: temperature (default 0, greedy), top_p (default 1), top_k (an extension,
    default 0 = off), seed (default random), stop (a string or a list), max_tokens or
    max_completion_tokens (default: the rest of the context). Non-streamed responses carry a
    `subspec` field with the decoding statistics (method, tau, decode tokens/s, ...); streamed
    responses carry it on the chunk with the finish_reason.
    """
    runner = Runner(runtime, method)
    model = runtime.cfg.model
    app = FastAPI(title="subspec", description=__doc__)
    _add_error_handlers(app)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model, "method": method}

    @app.get("/v1/models")
    def models() -> dict:
        card = {"id": model, "object": "model", "created": 0, "owned_by": "subspec"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        job = runner.job(req, _chat_prompt(runtime, req.messages))
        if req.stream:
            base = _base("chatcmpl", "chat.completion.chunk", model)
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}  # fmt: skip
            return _sse_response(_stream(runner, job, base, _chat_choice, (role,)))
        text, final = runner.complete(job)
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(final)}
        return {
            **_base("chatcmpl", "chat.completion", model),
            "choices": [choice],
            "usage": _usage(final),
            "subspec": _subspec(final),
        }

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        job = runner.job(req, encode(runtime.tokenizer, req.prompt, chat=False))
        base = _base("cmpl", "text_completion", model)
        if req.stream:
            return _sse_response(_stream(runner, job, base, _text_choice))
        text, final = runner.complete(job)
        return {
            **base,
            "choices": [_text_choice(text, _finish(final))],
            "usage": _usage(final),
            "subspec": _subspec(final),
        }

    return app


def serve(runtime, host: str, port: int, method: str | None = None) -> None:
    """Serve `runtime` over HTTP until interrupted (method: default_method(runtime) if None)."""
    import uvicorn

    method = method or default_method(runtime.methods, runtime.placement.streams)
    shown = f"[{host}]" if ":" in host else host
    print(f"subspec: serving {runtime.cfg.model} ({method}) at http://{shown}:{port}/v1",
          file=sys.stderr)  # fmt: skip
    print(runtime.placement.summary(), file=sys.stderr)
    uvicorn.run(create_app(runtime, method), host=host, port=port)

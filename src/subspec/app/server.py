"""An OpenAI-compatible HTTP server over one runtime.

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`,
`POST /v1/completions` (both with `stream` as server-sent events) and `GET /health`. One worker
thread decodes one request at a time, first come first served (app/queue.py); a client that
disconnects is dropped at once. Refusals get OpenAI's error body: 400 for a bad request, 404
for an unknown model, 413 for a body over the limit, 503 when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from subspec.app.http import ApiError, BodyLimit
from subspec.app.logprob_format import ChatLogprobs, CompletionLogprobs
from subspec.app.queue import END, Job, QueueFull, Worker
from subspec.config import SamplingConfig, default_method
from subspec.errors import SubspecError
from subspec.model.tokenizer import encode, encode_messages
from subspec.runtime.generate import Event
from subspec.runtime.logprobs import MAX_TOP_LOGPROBS
from subspec.runtime.runtime import Request

HIDDEN_STATS = ("accept_lengths", "placement")  # too bulky for every response
log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20
# a request that names no max_tokens gets this many at most: without a cap it would hold the
# only worker to the end of the context (4,096 tokens at ~8 tok/s: 8 minutes)
DEFAULT_MAX_TOKENS = 1024
MAX_STOP_STRINGS = 4  # as OpenAI's API
RETRY_AFTER_S = 5
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there


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
    """The fields both completion endpoints share. Other OpenAI fields are refused by name
    unless they hold their neutral value (see `unsupported`)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's range
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # an extension to the OpenAI API
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    def top_logprobs_count(self) -> int | None:
        """None: no log probabilities; k: each token's and its k most likely alternatives'."""
        return None

    def unsupported(self) -> list[str]:
        """Extra fields that would change the answer: anything not neutral nor ignorable."""
        extra = self.model_extra or {}
        return sorted(k for k, v in extra.items() if k not in IGNORED and not _neutral(k, v))


IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


def _neutral(key: str, value) -> bool:
    """Whether a field's value asks for nothing: logprobs false, penalties 0, best_of 1, ..."""
    if value is None or value is False or value in ("", [], {}):
        return True
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and (value == 0 or (key == "best_of" and value == 1))


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # OpenAI's is 0..5

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


def make_request(runtime, method: str, req: SamplingRequest, prompt_ids: list[int],
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> Request:  # fmt: skip
    """Validate a request against the runtime; raises SubspecError for a bad one.

    Defaults when the request leaves a field out: temperature 0 (greedy), top_p 1, top_k 0
    (off), a random seed, and max tokens = `max_tokens` (the server's cap) or the rest of the
    context, whichever is less.
    """
    if fields := req.unsupported():
        raise ApiError(f"unsupported field(s): {', '.join(fields)}", param=fields[0])
    room = runtime.cfg.context - len(prompt_ids)
    max_new = req.max_completion_tokens or req.max_tokens or max(min(room, max_tokens), 1)
    sampling = SamplingConfig(
        temperature=0.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=random.randrange(2**63) if req.seed is None else req.seed,
    )
    logprobs = req.top_logprobs_count()
    request = Request(prompt_ids, method, max_new, sampling, _stops(req.stop), logprobs=logprobs)
    runtime.check(len(prompt_ids), max_new, method, logprobs)
    return request


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if any(not s for s in stops):
        raise ApiError("stop strings must not be empty", param="stop")
    if len(stops) > MAX_STOP_STRINGS:  # each costs a search per batch of tokens
        raise ApiError(f"at most {MAX_STOP_STRINGS} stop strings (as OpenAI), got {len(stops)}",
                       param="stop")  # fmt: skip
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
        "prompt_tokens_details": {"cached_tokens": final.stats.cached_prompt_tokens},
    }


def _subspec(final: Event) -> dict:
    return {k: v for k, v in final.stats.to_dict().items() if k not in HIDDEN_STATS}


def _finish(final: Event) -> str:
    return final.finish_reason or "length"  # the decoder ran out of cache


def _chat_choice(text: str | None, reason: str | None, logprobs: dict | None = None) -> dict:
    delta = {} if text is None else {"content": text}
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


def _text_choice(text: str | None, reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": reason}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _job_events(job: Job, http: HttpRequest) -> AsyncIterator[Event]:
    """A job's events as the worker produces them; cancels the job when the client leaves
    (polled while waiting) or when the consumer stops early."""
    try:
        while True:
            try:
                item = await asyncio.wait_for(job.channel.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await http.is_disconnected():
                    return
                continue
            if item is END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        job.cancel()


async def _complete(job: Job, http: HttpRequest, logprobs: Callable | None = None
                    ) -> tuple[str, Event, dict | None]:  # fmt: skip
    """Run a job to the end: the whole text, the final event and, when the request asked,
    the log probabilities of all its tokens in `logprobs`'s shape."""
    pieces, final, entries = [], None, []
    async for ev in _job_events(job, http):
        pieces.append(ev.text)
        entries.extend(ev.logprobs or ())
        final = ev
    if final is None or final.stats is None:  # the client left
        raise ApiError("the client disconnected", status=499)
    # a stop string may end inside tokens already passed on: keep the ones the usage counts
    entries = entries[: final.stats.new_tokens]
    return "".join(pieces), final, logprobs(entries) if logprobs else None


async def _stream(
    job: Job, http: HttpRequest, base: dict, choice: Callable, include_usage: bool,
    head: tuple[dict, ...] = (), logprobs: Callable | None = None,
) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events: `head` choices, one chunk per text delta (or per batch of tokens,
    with their log probabilities in `logprobs`'s shape, when asked), the finish, [DONE]."""
    for c in head:
        yield _sse({**base, "choices": [c]})
    final = None
    try:
        async for ev in _job_events(job, http):
            if logprobs and ev.logprobs:
                yield _sse({**base, "choices": [choice(ev.text, None, logprobs(ev.logprobs))]})
            elif ev.text:
                yield _sse({**base, "choices": [choice(ev.text, None)]})
            final = ev
    except SubspecError as e:
        yield _sse(_error_body(str(e)))
        yield _sse("[DONE]")
        return
    if final is None or final.stats is None:  # the client left
        return
    yield _sse({**base, "choices": [choice(None, _finish(final))], "subspec": _subspec(final)})
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(final)})
    yield _sse("[DONE]")


class JobStream(StreamingResponse):
    """A streamed response that cancels its job however the response ends (a failed send to a
    client that went away included)."""

    def __init__(self, job: Job, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def _base(prefix: str, obj: str, model: str) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
    }


def _validation_message(error: dict) -> str:
    if error["type"] == "json_invalid":
        return f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}"
    return f"{'.'.join(str(x) for x in error['loc'][1:]) or 'body'}: {error['msg']}"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SubspecError)
    def bad_request(request, exc: SubspecError) -> JSONResponse:
        status, param, code = 400, None, None
        if isinstance(exc, ApiError):
            status, param, code = exc.status, exc.param, exc.code
        headers = {}
        if isinstance(exc, QueueFull):
            status, code, headers = 503, "queue_full", {"Retry-After": str(RETRY_AFTER_S)}
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = _error_body(str(exc), kind, param, code)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    def invalid(request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message = "; ".join(_validation_message(e) for e in errors)
        param = ".".join(str(x) for x in errors[0]["loc"][1:]) or None if errors else None
        return JSONResponse(_error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    def http_error(request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(_error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    def crash(request, exc: Exception) -> JSONResponse:
        # the details go to the server's log, not to the client
        incident = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s", incident, request.url.path, exc_info=exc)
        message = f"internal error (incident {incident}: see the server's log)"
        return JSONResponse(_error_body(message, "server_error"), 500)


class Service:
    """What the endpoints share: the runtime, its method, its names and its worker."""

    def __init__(self, runtime, method: str, max_queue: int, max_tokens: int):
        self.runtime, self.method, self.max_tokens = runtime, method, max_tokens
        self.model = runtime.cfg.model
        self.names = {self.model, Path(self.model).name}
        self.worker = Worker(runtime, max_queue)

    def card(self) -> dict:
        return {"id": self.model, "object": "model", "created": 0, "owned_by": "subspec"}

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise ApiError(
                f"the model {name!r} does not exist; this server serves {self.model!r}",
                status=404, param="model", code="model_not_found",
            )  # fmt: skip

    def submit(self, req: SamplingRequest, prompt_ids: list[int]) -> Job:
        """Validate and queue a request (ApiError, SubspecError or QueueFull)."""
        self.check_model(req.model)
        request = make_request(self.runtime, self.method, req, prompt_ids, self.max_tokens)
        cancelled = threading.Event()  # the job's flag, seen by prefill too
        job = Job(replace(request, cancelled=cancelled), asyncio.get_running_loop(),
                  cancelled=cancelled)  # fmt: skip
        self.worker.submit(job)
        return job

    def health(self) -> dict:
        """The server's state; "status" is "unavailable" (with a "reason") when the runtime
        cannot serve, e.g. after its slow tier failed a read."""
        worker = self.worker
        body = {"status": "ok", "model": self.model, "method": self.method,
                "busy": worker.busy, "queued": worker.queued}  # fmt: skip
        if (reason := self.runtime.unavailable()) is not None:
            body.update(status="unavailable", reason=reason)
        return body


def create_app(
    runtime, method: str, max_queue: int = 64, max_request_bytes: int = MAX_REQUEST_BYTES,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:  # fmt: skip
    """The FastAPI app serving `runtime` with decoding `method`; `app.state.service.worker`
    is the generation thread (close it when done).

    Sampling fields: temperature (default 0, greedy; 0..2), top_p (default 1), top_k (an
    extension, default 0 = off), seed (default random), stop (a string or a list of up to 4),
    max_tokens or max_completion_tokens (default: `max_tokens`, the server's cap, or the rest
    of the context, whichever is less). Log probabilities: chat's logprobs (bool) and
    top_logprobs (0..20), completions' logprobs (0..20), from the target's own logits (before
    temperature, top-k and top-p). Non-streamed responses carry
    a `subspec` field with the decoding statistics (method, tau, decode tokens/s, ...);
    streamed responses carry it on the chunk with the finish_reason.
    """
    service = Service(runtime, method, max_queue, max_tokens)
    app = FastAPI(title="subspec", description=__doc__)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    _add_error_handlers(app)
    _add_routes(app, service)
    return app


def _add_routes(app: FastAPI, service: Service) -> None:
    runtime, model = service.runtime, service.model

    @app.get("/health")
    def health() -> JSONResponse:
        body = service.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [service.card()]}

    @app.get("/v1/models/{name:path}")
    def model_card(name: str) -> dict:
        service.check_model(name)
        return service.card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, http: HttpRequest):
        # templating and tokenizing up to a MiB: off the event loop, which keeps serving
        prompt_ids = await asyncio.to_thread(_chat_prompt, runtime, req.messages)
        job = service.submit(req, prompt_ids)
        usage = bool(req.stream_options and req.stream_options.include_usage)
        shape = ChatLogprobs(runtime.tokenizer) if req.logprobs else None
        if req.stream:
            base = _base("chatcmpl", "chat.completion.chunk", model)
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}  # fmt: skip
            events = _stream(job, http, base, _chat_choice, usage, (role,), shape)
            return JobStream(job, events)
        text, final, logprobs = await _complete(job, http, shape)
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": logprobs,
                  "finish_reason": _finish(final)}  # fmt: skip
        return {
            **_base("chatcmpl", "chat.completion", model),
            "choices": [choice],
            "usage": _usage(final),
            "subspec": _subspec(final),
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: HttpRequest):
        prompt_ids = await asyncio.to_thread(encode, runtime.tokenizer, req.prompt, False)
        job = service.submit(req, prompt_ids)
        usage = bool(req.stream_options and req.stream_options.include_usage)
        base = _base("cmpl", "text_completion", model)
        shape = CompletionLogprobs(runtime.tokenizer) if req.logprobs is not None else None
        if req.stream:
            return JobStream(job, _stream(job, http, base, _text_choice, usage, (), shape))
        text, final, logprobs = await _complete(job, http, shape)
        return {
            **base,
            "choices": [_text_choice(text, _finish(final), logprobs)],
            "usage": _usage(final),
            "subspec": _subspec(final),
        }


def serve(runtime, host: str, port: int, method: str | None = None, max_queue: int = 64,
          max_request_bytes: int = MAX_REQUEST_BYTES,
          max_tokens: int = DEFAULT_MAX_TOKENS) -> None:  # fmt: skip
    """Serve `runtime` over HTTP until SIGINT/SIGTERM (method: default_method if None).

    On a signal every job is cancelled at once, open streams end, and the worker thread is
    joined before this returns.
    """
    import uvicorn

    method = method or default_method(runtime.methods, runtime.placement.streams)
    app = create_app(runtime, method, max_queue, max_request_bytes, max_tokens)
    worker = app.state.service.worker

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            worker.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=2)  # fmt: skip
    shown = f"[{host}]" if ":" in host else host
    print(f"subspec: serving {runtime.cfg.model} ({method}) at http://{shown}:{port}/v1 "
          f"(queue up to {max_queue}; Ctrl-C stops)", file=sys.stderr)  # fmt: skip
    print(runtime.placement.summary(), file=sys.stderr)
    try:
        Server(config).run()
    finally:
        worker.close()

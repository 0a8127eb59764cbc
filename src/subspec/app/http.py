"""HTTP plumbing for the server: errors that carry a status, and the request body limit."""

from __future__ import annotations

import json

from subspec.errors import SubspecError


class ApiError(SubspecError):
    """A refusal with an HTTP status and OpenAI's `param` and `code` fields."""

    def __init__(self, message: str, status: int = 400, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, before parsing.

    A declared Content-Length is checked before anything is read; a chunked body is read up to
    the limit, then handed on as one message.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        body = await self._read(receive)
        if body is None:
            await self._refuse(send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None when it is over the limit (or the client left)."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _refuse(self, send) -> None:
        message = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        error = {"message": message, "type": "invalid_request_error", "param": None,
                 "code": "request_too_large"}  # fmt: skip
        body = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive):
    """A receive that gives the buffered body once, then the client's later messages."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

"""A real uvicorn server on a free loopback port, in a background thread, for client tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class LiveServer:
    """Serve an app created by subspec.app.server.create_app; `url` is its /v1 base URL."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.app.state.service.worker.stop()
        self.server.should_exit = True
        self.thread.join(5)
        self.app.state.service.worker.close()
        self.sock.close()

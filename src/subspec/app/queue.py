"""The request queue in front of a runtime: one worker thread owns the runtime and runs jobs
first come, first served; each job streams its events to its HTTP handler through a
thread-safe channel, and a cancelled job (its client went away) is dropped at once.

No lock is ever held inside a generator: the worker alone touches the runtime, and closes a
generation's generator as soon as its job is cancelled (checked between token batches).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field

from subspec.errors import SubspecError
from subspec.runtime.generate import stream_generate
from subspec.runtime.runtime import Request
from subspec.speculative.decoding import Cancelled

END = object()  # the last item of a job's channel


class QueueFull(SubspecError):
    """More clients are waiting than --max-queue allows."""


@dataclass
class Job:
    """One generation: its request, its channel to the handler and its cancel flag."""

    request: Request
    loop: asyncio.AbstractEventLoop  # the handler's event loop, fed from the worker thread
    channel: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None

    def put(self, item) -> None:
        """Hand an event, an exception or END to the handler (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.channel.put_nowait, item)
        except RuntimeError:  # the handler's loop is gone: nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def wait_s(self) -> float:
        """Seconds spent in the queue before the worker took the job."""
        return (self.started or time.monotonic()) - self.enqueued


class Worker:
    """The thread that owns the runtime, fed by a FIFO of jobs bounded by `max_queue`."""

    def __init__(self, runtime, max_queue: int = 64):
        self.runtime, self.max_queue = runtime, max_queue
        self.jobs: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.current: Job | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="subspec-worker", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return self.current is not None

    @property
    def queued(self) -> int:
        with self.cond:
            return sum(not j.cancelled.is_set() for j in self.jobs)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull (and SubspecError once stopping)."""
        with self.cond:
            if self.stopping:
                raise SubspecError("the server is shutting down")
            self.jobs = collections.deque(j for j in self.jobs if not j.cancelled.is_set())
            if len(self.jobs) >= self.max_queue:
                raise QueueFull(f"{len(self.jobs)} requests are waiting (--max-queue); retry")
            self.jobs.append(job)
            self.cond.notify()

    def stop(self) -> None:
        """Cancel every job, queued or running, and let the thread end (does not wait)."""
        with self.cond:
            self.stopping = True
            for job in [*self.jobs, self.current]:
                if job is not None:
                    job.cancel()
                    job.put(SubspecError("the server is shutting down"))
            self.jobs.clear()
            self.cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Stop, and wait for the thread to end."""
        self.stop()
        self.thread.join(timeout)

    def _next(self) -> Job | None:
        with self.cond:
            while not self.stopping:
                while self.jobs:
                    job = self.jobs.popleft()
                    if not job.cancelled.is_set():
                        self.current, job.started = job, time.monotonic()
                        return job
                self.cond.wait()
            return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._generate(job)
            finally:
                self.current = None

    def _generate(self, job: Job) -> None:
        """Run one job, passing every event on; stop between batches once it is cancelled."""
        try:
            with closing(stream_generate(self.runtime, job.request)) as events:
                for ev in events:
                    if job.cancelled.is_set():
                        return
                    job.put(ev)
        except Cancelled:  # during prefill: nobody waits for an answer
            return
        except Exception as e:  # a bad request, or a runtime failure: the handler reports it
            job.put(e)
            return
        job.put(END)

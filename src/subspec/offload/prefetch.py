"""Background prefetch of units from a slow store into a ring of reused fast buffers.

Units are consumed in the same order on every forward pass. The prefetcher numbers the
infinite cyclic sequence ``units[0], units[1], ..., units[-1], units[0], ...`` by *position*
``p`` (unit ``units[p % len(units)]``) and fills position ``p`` into buffer ``p % n_buffers``
as soon as position ``p - n_buffers`` has been released, so reads run ahead across the end of a
pass into the next one while the caller does other work (e.g. drafting).

Consumer protocol (one consumer thread)::

    buf = pf.acquire(unit)              # uint8 [store.nbytes(unit)], blocks until filled
    w = tensors_from_buffer(buf, store.manifests[unit])
    ... compute with w ...
    pf.release(unit)                    # the buffer may now be refilled

Out-of-order use: ``acquire(u)`` takes the next occurrence of ``u`` at or after the expected
position. Positions jumped over are *skipped*: reads not yet started are cancelled, finished
ones discarded, and ``stats.skipped`` counts them. So skipping layers moves forward within the
pass, and acquiring an earlier unit (e.g. restarting a pass after an aborted one) moves to that
unit in the next pass. A unit not in ``units`` raises SubspecError, as does an acquire whose
buffer is still held (a held position ``n_buffers`` or more behind it: release first).

Errors: an exception in a reader thread stops reading; it is raised (as SubspecError, chained
to the original) by every ``acquire`` of a unit not already in a buffer, never a hang. Units
read before the failure are still served. ``recover()`` then starts reading anew from the
first unit (between requests, when the consumer holds no buffer).

CUDA: copies are issued by the reader thread on a side stream. ``acquire`` makes the caller's
current stream wait for the buffer's copy-done event; ``release`` records a free event on the
caller's current stream, and the next copy into that buffer waits for it on the side stream.
Call ``acquire``/``release`` with the compute stream current. ``stats.wait_s`` then counts only
host-side waiting (for the copy to be issued), not GPU-side waiting.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from subspec.errors import SubspecError
from subspec.offload.stores import SlowStore, read_buffer


@dataclass
class PrefetchStats:
    """Counters since construction or the last ``reset_stats``."""

    bytes_read: int = 0
    reads: int = 0
    read_s: float = 0.0  # time reader threads spent in store.read_into (issue time on CUDA)
    wait_s: float = 0.0  # time acquire() blocked waiting for a unit
    idle_s: float = 0.0  # time acquire() spent in its caller's other work while waiting
    skipped: int = 0  # positions jumped over by out-of-order acquires


class Prefetcher:
    """Streams ``units`` (in consumption order, cyclically) from ``store`` into ``n_buffers``.

    ``device``: where buffers live ("cpu" or a CUDA device). ``n_threads``: reader threads,
    each reading a different unit; a second one only helps with ``n_buffers >= 3`` (with 2
    buffers and one held, one buffer is free), and DiskStore already keeps several pieces of
    one unit in flight. Buffers are allocated once, sized to the largest unit. ``close()``
    does not close the store.
    """

    sync_class = None  # the CUDA ordering (None: _CudaSync); offload/stress.py removes it

    def __init__(
        self,
        store: SlowStore,
        units: list[int],
        n_buffers: int = 2,
        device: str | torch.device = "cpu",
        n_threads: int = 1,
    ):
        self._validate(store, units, n_buffers, n_threads)
        self.store, self.units, self.n_buffers = store, list(units), n_buffers
        self.device = torch.device(device)
        store.check_device(self.device)
        self.stats = PrefetchStats()
        self._cond = threading.Condition()
        self._next_fill = 0  # next position a reader claims
        self._next_acquire = 0  # positions below it are held or released/skipped
        self._held: list[int] = []  # acquired, unreleased positions, oldest first
        self._ready = [-1] * n_buffers  # slot -> position whose bytes it holds
        self._busy: set[int] = set()  # slots being filled
        self._filling = [-1] * n_buffers  # slot -> position being read into it
        self._started = [0.0] * n_buffers  # slot -> when that read was claimed
        self._error: BaseException | None = None
        self._closed = False
        self._buffers = self._allocate(max(store.nbytes(u) for u in self.units))
        sync = self.sync_class or _CudaSync
        self._cuda = sync(self.device, n_buffers) if self.device.type == "cuda" else None
        self._threads = self._start(n_threads)

    def _start(self, n_threads: int) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._run, name=f"subspec-prefetch-{i}", daemon=True)
            for i in range(n_threads)
        ]
        for t in threads:
            t.start()
        return threads

    @staticmethod
    def _validate(store: SlowStore, units: list[int], n_buffers: int, n_threads: int) -> None:
        if not units:
            raise SubspecError("Prefetcher needs at least one unit")
        if n_buffers < 1 or n_threads < 1:
            raise SubspecError("n_buffers and n_threads must be >= 1")
        missing = [u for u in units if u not in store.manifests]
        if missing:
            raise SubspecError(f"units not in the store: {missing}")

    def _allocate(self, size: int) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return [read_buffer(size) for _ in range(self.n_buffers)]
        return [
            torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(self.n_buffers)
        ]

    # ---- consumer side -------------------------------------------------------------------

    def acquire(
        self, unit: int, idle: Callable[[float], bool] | None = None
    ) -> torch.Tensor:  # fmt: skip
        """Block until ``unit``'s bytes are in a buffer; return it (uint8 [nbytes(unit)]).

        ``idle(expected_wait_s)``: other work to do while the bytes are not there yet, one short
        unit per call, told how much longer the bytes are expected to take (see
        ``expected_wait``); it returns False when it did nothing (no work left, or none that
        fits). Its time counts as ``stats.idle_s``."""
        with self._cond:
            pos = self._target_position(unit)
            self.stats.skipped += pos - self._next_acquire
            self._next_acquire = pos  # earlier positions are skipped
            self._cond.notify_all()
        slot = pos % self.n_buffers
        if idle is not None:
            start = time.perf_counter()
            while not self._arrived(slot, pos) and idle(self.expected_wait(slot, pos, unit)):
                pass
            self.stats.idle_s += time.perf_counter() - start
        with self._cond:
            start = time.perf_counter()
            self._cond.wait_for(lambda: self._ready[slot] == pos or self._failed())
            self.stats.wait_s += time.perf_counter() - start
            if self._ready[slot] != pos:
                self._raise_if_failed()
            self._held.append(pos)
            self._next_acquire = pos + 1
        if self._cuda:
            self._cuda.before_use(slot)
        return self._buffers[slot][: self.store.nbytes(unit)]

    def expected_wait(self, slot: int, pos: int, unit: int) -> float:
        """Seconds until position ``pos`` is expected in ``slot``, at the read rate timed so far:
        what is left of its read if it is being read, a whole read if it has not started; inf
        when no read was timed yet or on CUDA (where reads are timed as issued, not landed)."""
        with self._cond:
            if self._ready[slot] == pos:
                return 0.0
            if self._cuda or self.stats.read_s <= 0:
                return math.inf
            read_s = self.store.nbytes(unit) * self.stats.read_s / self.stats.bytes_read
            if slot in self._busy and self._filling[slot] == pos:
                return max(0.0, self._started[slot] + read_s - time.perf_counter())
            return read_s

    def _arrived(self, slot: int, pos: int) -> bool:
        with self._cond:
            return self._ready[slot] == pos or self._failed()

    def _target_position(self, unit: int) -> int:
        if self._closed:
            raise SubspecError("Prefetcher is closed")
        n = len(self.units)
        start = self._next_acquire
        pos = next((p for p in range(start, start + n) if self.units[p % n] == unit), None)
        if pos is None:
            raise SubspecError(f"unit {unit} is not in the prefetch order {self.units}")
        if self._held and self._held[0] <= pos - self.n_buffers:
            raise SubspecError(
                f"cannot acquire unit {unit}: its buffer is still held (n_buffers="
                f"{self.n_buffers}, holding units {[self.units[p % n] for p in self._held]})"
            )
        return pos

    def release(self, unit: int) -> None:
        """Hand ``unit``'s buffer back (the oldest held occurrence) so it can be refilled."""
        n = len(self.units)
        with self._cond:
            pos = next((p for p in self._held if self.units[p % n] == unit), None)
            if pos is None:
                raise SubspecError(f"release({unit}): unit is not held")
            if self._cuda:
                self._cuda.after_use(pos % self.n_buffers)
            self._held.remove(pos)
            self._cond.notify_all()

    def reset_stats(self) -> None:
        """Zero the counters."""
        with self._cond:
            self.stats = PrefetchStats()

    def close(self) -> None:
        """Stop and join the reader threads (an in-flight read finishes first)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        if self._cuda:
            self._cuda.stream.synchronize()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def recover(self) -> bool:
        """After a reader's error: forget it and every position, and read again from the
        first unit, with new reader threads. Call it when the consumer holds no buffer (between
        requests). Returns whether there was an error to recover from."""
        with self._cond:
            if self._error is None or self._closed:
                return False
        for t in self._threads:  # each stops once it sees the error
            t.join()
        if self._cuda:
            self._cuda.stream.synchronize()
        with self._cond:
            self._error = None
            self._next_fill = self._next_acquire = 0
            self._held.clear()
            self._busy.clear()
            self._ready = [-1] * self.n_buffers
            self._filling = [-1] * self.n_buffers
        self._threads = self._start(len(self._threads))
        return True

    @property
    def failure(self) -> str | None:
        """Why no unit can be acquired any more (a reader's error, or closed), or None."""
        if self._error is not None:
            return f"a read failed: {self._error}"
        return "closed" if self._closed else None

    def _failed(self) -> bool:
        return self._error is not None or self._closed

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise SubspecError(f"prefetch reader failed: {self._error}") from self._error
        if self._closed:
            raise SubspecError("Prefetcher is closed")

    # ---- reader side ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._cuda:
                with torch.cuda.device(self.device):
                    self._read_loop()
            else:
                self._read_loop()
        except BaseException as e:  # surfaced to the consumer by acquire()
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _read_loop(self) -> None:
        while (pos := self._claim()) is not None:
            slot = pos % self.n_buffers
            unit = self.units[pos % len(self.units)]
            start = time.perf_counter()
            self._fill(unit, slot)
            elapsed = time.perf_counter() - start
            with self._cond:
                self._busy.discard(slot)
                self._ready[slot] = pos
                self.stats.reads += 1
                self.stats.bytes_read += self.store.nbytes(unit)
                self.stats.read_s += elapsed
                self._cond.notify_all()

    def _claim(self) -> int | None:
        """Wait for the next position whose buffer is free; None when stopping."""
        with self._cond:
            while not self._can_fill():
                if self._failed():
                    return None
                self._cond.wait()
            if self._failed():
                return None
            pos = self._next_fill
            self._next_fill += 1
            slot = pos % self.n_buffers
            self._busy.add(slot)
            self._ready[slot] = -1
            self._filling[slot], self._started[slot] = pos, time.perf_counter()
            return pos

    def _can_fill(self) -> bool:
        """Whether ``_next_fill`` may be read now (skipped positions are dropped first)."""
        self._next_fill = max(self._next_fill, self._next_acquire)
        oldest_needed = self._held[0] if self._held else self._next_acquire
        pos = self._next_fill
        return pos < oldest_needed + self.n_buffers and pos % self.n_buffers not in self._busy

    def _fill(self, unit: int, slot: int) -> None:
        buffer = self._buffers[slot]
        if self._cuda is None:
            self.store.read_into(unit, buffer)
            return
        stream = self._cuda.stream
        stream.wait_event(self._cuda.free[slot])  # previous user's compute is done
        self.store.read_into(unit, buffer, stream=stream)
        self._cuda.ready[slot].record(stream)


class _CudaSync:
    """Side copy stream and per-buffer events ordering copies against compute."""

    def __init__(self, device: torch.device, n_buffers: int):
        self.stream = torch.cuda.Stream(device)
        # An event never recorded is complete: waiting on it is a no-op (first use of a slot).
        self.ready = [torch.cuda.Event() for _ in range(n_buffers)]
        self.free = [torch.cuda.Event() for _ in range(n_buffers)]
        self.device = device

    def before_use(self, slot: int) -> None:
        """Make the caller's current stream wait until ``slot``'s copy has landed."""
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def after_use(self, slot: int) -> None:
        """Record, on the caller's current stream, that ``slot``'s user has queued its work."""
        self.free[slot].record(torch.cuda.current_stream(self.device))

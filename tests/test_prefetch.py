"""The prefetcher: reads run ahead of use through a ring of buffers, in a cyclic order, with
skips and restarts, errors surfaced (and recovered from), and CUDA's event protocol (faked)."""

from __future__ import annotations

import contextlib
import errno
import random
import threading
import time

import pytest
import torch
from helpers import assert_same, make_layer

from subspec.errors import SubspecError
from subspec.offload.layer_file import plan_layout, tensors_from_buffer
from subspec.offload.prefetch import Prefetcher
from subspec.offload.stores import DiskStore, PinnedHostStore, SlowStore


class FakeStore(SlowStore):
    """Unit u is ``nbytes`` bytes all equal to u; reads are slow and logged; can fail."""

    def __init__(self, n_units: int, nbytes: int = 8192, delay: float = 0.0, fail_unit=None):
        self.manifests = {u: plan_layout({"w": torch.empty(nbytes, dtype=torch.uint8)})
                          for u in range(n_units)}  # fmt: skip
        self.delay, self.fail_unit = delay, fail_unit
        self.started: list[int] = []  # units, in the order their reads began
        self.lock = threading.Lock()

    def read_into(self, unit, dst, stream=None):
        with self.lock:
            self.started.append(unit)
        time.sleep(self.delay)
        if unit == self.fail_unit:
            raise OSError(errno.EIO, "simulated read failure")
        dst[: self.nbytes(unit)].fill_(unit)


def consume(pf: Prefetcher, unit: int, hold: float = 0.0) -> None:
    buf = pf.acquire(unit)
    assert buf.numel() == pf.store.nbytes(unit) and bool(buf.eq(unit).all())
    time.sleep(hold)
    pf.release(unit)


def test_prefetcher_delivers_correct_bytes_over_passes(layer_dir):
    directory, manifests, tensors = layer_dir
    store = DiskStore(directory, manifests, direct=None, io_threads=2)
    with store, Prefetcher(store, list(manifests), n_buffers=2) as pf:
        ptrs = set()
        for _ in range(3):
            for unit in manifests:
                buf = pf.acquire(unit)
                ptrs.add(buf.data_ptr())
                assert_same(tensors_from_buffer(buf, manifests[unit]), tensors[unit])
                pf.release(unit)
        assert len(ptrs) == 2  # the same two buffers, reused
        assert pf.stats.reads >= 18 and pf.stats.skipped == 0


def wait_until(condition, timeout: float = 5.0) -> None:
    """Poll until condition() holds or timeout passes (a generous bound: no timing claim)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_prefetcher_overlaps_reads_with_use(n_threads):
    store = FakeStore(6, delay=0.02)
    with Prefetcher(store, list(range(6)), n_buffers=2, n_threads=n_threads) as pf:
        for unit in range(6):
            buf = pf.acquire(unit)
            if unit < 5:  # while unit i is held, the read of unit i+1 begins
                wait_until(lambda u=unit: u + 1 in store.started)
                assert unit + 1 in store.started
            assert bool(buf.eq(unit).all())
            pf.release(unit)
        wait_until(lambda: pf.stats.reads >= 8)  # between passes: the next pass's first units
        assert store.started[6:8] == [0, 1]
        consume(pf, 0)


def test_idle_work_is_told_the_expected_wait():
    """acquire's idle work hears how long the bytes should still take: unknown (inf) before any
    read was timed, then at most one read's time at the rate timed so far, so never more than
    all the reads timed by the end (an invariant, not a timing: the rate may change)."""
    store = FakeStore(6, delay=0.05)
    heard = []

    def idle(expected_wait_s):
        heard.append(expected_wait_s)
        time.sleep(0.005)
        return True

    with Prefetcher(store, list(range(6)), n_buffers=2) as pf:
        for unit in range(4):
            pf.acquire(unit, idle)
            pf.release(unit)
    assert heard[0] == float("inf")
    timed = [w for w in heard if w != float("inf")]
    assert timed and all(0.0 <= w <= pf.stats.read_s for w in timed)


def test_prefetcher_cyclic_order_with_slow_store():
    store = FakeStore(6, delay=0.005)
    with Prefetcher(store, [0, 1, 2, 3, 4, 5], n_buffers=2) as pf:
        for _ in range(3):
            for unit in range(6):
                consume(pf, unit)
    assert store.started[:18] == list(range(6)) * 3


def test_prefetcher_reader_error_surfaces():
    store = FakeStore(6, fail_unit=3)
    with Prefetcher(store, list(range(6)), n_buffers=2) as pf:
        for unit in range(3):
            consume(pf, unit)
        with pytest.raises(SubspecError, match="simulated read failure"):
            pf.acquire(3)
        with pytest.raises(SubspecError, match="reader failed"):
            pf.acquire(4)


def test_prefetcher_recovers_after_a_reader_error():
    """Once the failing store reads again, recover() restarts from the first unit: every
    unit comes back with its own bytes, pass after pass."""
    store = FakeStore(4, fail_unit=2)
    with Prefetcher(store, list(range(4)), n_buffers=2) as pf:
        consume(pf, 0)
        with pytest.raises(SubspecError, match="simulated read failure"):
            pf.acquire(2)
        assert "read failed" in pf.failure
        store.fail_unit = None
        assert pf.recover() and pf.failure is None
        for _ in range(2):
            for unit in range(4):
                consume(pf, unit)
        assert not pf.recover()  # nothing to recover from


def test_prefetcher_skip_and_restart():
    store = FakeStore(6)
    with Prefetcher(store, list(range(6)), n_buffers=2) as pf:
        consume(pf, 0)
        consume(pf, 2)  # skips unit 1
        assert pf.stats.skipped == 1
        consume(pf, 0)  # restart: unit 0 of the next pass; units 3..5 are skipped
        assert pf.stats.skipped == 4
        for unit in range(1, 6):
            consume(pf, unit)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_prefetcher_random_skips_stay_consistent(n_threads):
    store = FakeStore(7, delay=0.0005)
    rng = random.Random(n_threads)
    with Prefetcher(store, list(range(7)), n_buffers=3, n_threads=n_threads) as pf:
        unit = 0
        for _ in range(300):
            unit = rng.randrange(7) if rng.random() < 0.2 else unit
            consume(pf, unit)
            unit = (unit + 1) % 7


def test_prefetcher_misuse_raises():
    store = FakeStore(4)
    with Prefetcher(store, list(range(4)), n_buffers=2) as pf:
        with pytest.raises(SubspecError, match="not in the prefetch order"):
            pf.acquire(9)
        with pytest.raises(SubspecError, match="not held"):
            pf.release(0)
        pf.acquire(0)
        pf.acquire(1)  # two held: both buffers in use
        with pytest.raises(SubspecError, match="still held"):
            pf.acquire(2)
        pf.release(1)  # releases may come in any order
        pf.release(0)
        consume(pf, 2)


def test_prefetcher_rejects_disk_store_on_cuda(layer_dir):
    directory, manifests, _ = layer_dir
    with DiskStore(directory, manifests) as store:
        with pytest.raises(SubspecError, match="CPU buffers only"):
            Prefetcher(store, [0, 1], device="cuda")


def test_close_joins_threads():
    store = FakeStore(6, delay=0.01)
    pf = Prefetcher(store, list(range(6)), n_buffers=2, n_threads=2)
    consume(pf, 0)
    pf.acquire(1)  # readers now block waiting for a free buffer
    pf.close()
    assert not any(t.is_alive() for t in pf._threads)
    with pytest.raises(SubspecError, match="closed"):
        pf.acquire(2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetcher_cuda_pinned():
    tensors = {u: make_layer(u) for u in range(4)}
    store = PinnedHostStore(tensors)
    with Prefetcher(store, list(range(4)), n_buffers=2, device="cuda") as pf:
        for _ in range(2):
            for unit in range(4):
                views = tensors_from_buffer(pf.acquire(unit), store.manifests[unit])
                got = {k: v.cpu() for k, v in views.items()}
                pf.release(unit)
                assert_same(got, tensors[unit])


class FakeEvent:
    """Counts its recordings; logs them."""

    def __init__(self, name, log):
        self.name, self.log, self.records = name, log, 0

    def record(self, stream=None):
        self.records += 1
        self.log.append(("record", self.name, self.records))


class FakeStream:
    def __init__(self, log):
        self.log = log

    def wait_event(self, event):
        self.log.append(("wait", event.name, event.records))

    def synchronize(self):
        self.log.append(("sync",))


def test_cuda_event_protocol_with_fakes(monkeypatch):
    """Without a GPU: the order of waits and records the CUDA path issues, on fake events."""
    import subspec.offload.prefetch as prefetch

    log = []

    class FakeCudaSync:
        def __init__(self, device, n_buffers):
            self.stream = FakeStream(log)
            self.ready = [FakeEvent(f"ready{i}", log) for i in range(n_buffers)]
            self.free = [FakeEvent(f"free{i}", log) for i in range(n_buffers)]

        def before_use(self, slot):
            log.append(("use", f"ready{slot}", self.ready[slot].records))

        def after_use(self, slot):
            self.free[slot].record()

    class LoggingStore(FakeStore):
        def read_into(self, unit, dst, stream=None):
            assert isinstance(stream, FakeStream)
            log.append(("read", unit))
            super().read_into(unit, dst)

    monkeypatch.setattr(prefetch, "_CudaSync", FakeCudaSync)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(
        Prefetcher,
        "_allocate",
        lambda self, size: [torch.empty(size, dtype=torch.uint8) for _ in range(2)],
    )
    with Prefetcher(LoggingStore(3), [0, 1, 2], n_buffers=2, device="cuda") as pf:
        for _ in range(3):
            for unit in range(3):
                consume(pf, unit)
    copy_done = {("record", "ready0"), ("record", "ready1")}
    reader = [e for e in log if e[0] in ("wait", "read") or e[:2] in copy_done]
    # one reader thread fills positions 0, 1, 2, ... in turn; position p goes to slot p % 2,
    # its copy first waits for the free event recorded by the release of position p - 2, then
    # records the slot's copy-done event
    expected = []
    for pos in range(len(reader) // 3):
        slot, k = pos % 2, pos // 2
        expected += [
            ("wait", f"free{slot}", k),
            ("read", pos % 3),
            ("record", f"ready{slot}", k + 1),
        ]
    assert reader == expected and len(expected) >= 27
    uses = [e for e in log if e[0] == "use"]
    assert uses == [("use", f"ready{p % 2}", p // 2 + 1) for p in range(9)]
    assert log[-1] == ("sync",)

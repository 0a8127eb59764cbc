"""Layer files, slow stores and the prefetcher (fast, CPU only, no network)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import make_runtime, minimum_budget, write_tiny

from subspec.bench.bandwidth import measure_disk_bandwidth, measure_slow_tier_bandwidth
from subspec.errors import SubspecError
from subspec.offload.layer_file import (
    ALIGN,
    layer_path,
    plan_layout,
    read_manifest,
    read_manifests,
    tensors_from_buffer,
    write_layer_file,
)
from subspec.offload.prefetch import Prefetcher
from subspec.offload.stores import (
    HUGE_PAGE,
    DiskStore,
    PinnedHostStore,
    SlowStore,
    aligned_empty,
    read_buffer,
)
from subspec.offload.streamed import StreamedHead, StreamedLayers
from subspec.runtime.weights import ensure_head_files, head_chunk_rows
from subspec.speculative.decoding import prefill


def make_layer(seed: int) -> dict[str, torch.Tensor]:
    """A unit with mixed dtypes and odd shapes, including a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "q_proj.weight": torch.randn(7, 13, generator=g).to(torch.bfloat16),
        "q_proj.bias": torch.randn(7, generator=g),
        "mlp.down_proj.weight": torch.randn(3, 5, 11, generator=g).half(),
        "ids": torch.randint(-(2**40), 2**40, (9,), generator=g),
        "codes": torch.randint(-128, 127, (4097,), generator=g, dtype=torch.int8),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scale": torch.tensor(seed + 0.5),
        "empty": torch.empty(0, 3),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


@pytest.fixture
def layer_dir(tmp_path):
    """Six layer files; returns (directory, manifests, tensors by unit)."""
    tensors = {u: make_layer(u) for u in range(6)}
    manifests = {u: write_layer_file(layer_path(tmp_path, u), t) for u, t in tensors.items()}
    return tmp_path, manifests, tensors


def test_layer_file_round_trip(tmp_path):
    tensors = make_layer(0)
    path = tmp_path / "layer.bin"
    manifest = write_layer_file(path, tensors)
    assert read_manifest(path) == manifest
    assert os.path.getsize(path) == manifest.file_bytes
    assert manifest.data_offset % ALIGN == 0 and manifest.total_bytes % ALIGN == 0
    assert all(e.offset % ALIGN == 0 for e in manifest.tensors)
    with open(path, "rb") as f:
        f.seek(manifest.data_offset)
        raw = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    assert_same(tensors_from_buffer(raw, manifest), tensors)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away


def test_views_are_zero_copy():
    tensors = make_layer(1)
    manifest = plan_layout(tensors)
    buf = torch.zeros(manifest.total_bytes, dtype=torch.uint8)
    views = tensors_from_buffer(buf, manifest)
    buf.fill_(1)
    assert views["codes"].eq(1).all()
    assert views["q_proj.bias"].untyped_storage().data_ptr() == buf.data_ptr()


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "layer.bin"
    manifest = write_layer_file(path, make_layer(2))
    os.truncate(path, manifest.file_bytes - ALIGN)
    with pytest.raises(SubspecError, match="truncated"):
        read_manifest(path)
    os.truncate(path, 10)
    with pytest.raises(SubspecError, match="not a subspec layer file"):
        read_manifest(path)


def test_short_buffer_rejected():
    manifest = plan_layout(make_layer(3))
    with pytest.raises(SubspecError, match="needs"):
        tensors_from_buffer(torch.empty(manifest.total_bytes - 1, dtype=torch.uint8), manifest)


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 123457])
@pytest.mark.parametrize("alignment", [64, 4096, 1 << 16])
def test_aligned_empty(nbytes, alignment):
    t = aligned_empty(nbytes, alignment)
    assert t.dtype == torch.uint8 and t.numel() == nbytes
    assert t.data_ptr() % alignment == 0


@pytest.mark.parametrize("nbytes", [1, 4096, 5 * HUGE_PAGE + 123])
def test_read_buffer_is_zeroed_and_aligned_to_huge_pages(nbytes):
    t = read_buffer(nbytes)
    assert t.dtype == torch.uint8 and t.numel() == nbytes and not t.any()
    assert t.data_ptr() % HUGE_PAGE == 0
    t.fill_(7)  # writable
    assert int(t[-1]) == 7


def _thp_offered() -> bool:
    """Transparent huge pages in "always" or "madvise" mode."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else ""
    return "[always]" in text or "[madvise]" in text


def _huge_page_kb(address: int) -> int:
    """AnonHugePages (kB) of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        field = line.split()[0]
        if not field.endswith(":"):  # a mapping's header: "lo-hi perms offset dev inode path"
            lo, hi = (int(x, 16) for x in field.split("-"))
            inside = lo <= address < hi
        elif inside and field == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not _thp_offered(), reason="no transparent huge pages on this kernel")
def test_read_buffer_gets_huge_pages():
    t = read_buffer(8 * HUGE_PAGE).fill_(1)  # touched: the pages are allocated now
    assert _huge_page_kb(t.data_ptr()) > 0


def read_unit(store: SlowStore, unit: int) -> dict[str, torch.Tensor]:
    buf = aligned_empty(store.nbytes(unit))
    store.read_into(unit, buf)
    return tensors_from_buffer(buf, store.manifests[unit])


@pytest.mark.parametrize("io_threads", [1, 3])
def test_disk_store_direct(layer_dir, io_threads):
    directory, manifests, tensors = layer_dir
    try:
        store = DiskStore(
            directory, manifests, direct=True, chunk_bytes=ALIGN, io_threads=io_threads
        )
    except SubspecError:
        pytest.skip("tmp_path's filesystem refuses O_DIRECT")
    assert store.mode == "direct"
    for unit in manifests:
        assert_same(read_unit(store, unit), tensors[unit])
    store.close()
    with pytest.raises(SubspecError, match="aligned"):
        store.read_into(0, aligned_empty(store.nbytes(0) + 1)[1:])


def test_disk_store_buffered(layer_dir):
    directory, manifests, tensors = layer_dir
    store = DiskStore(directory, read_manifests(directory), direct=False)
    assert store.mode == "buffered"
    for unit in manifests:
        assert_same(read_unit(store, unit), tensors[unit])


def test_disk_store_falls_back_when_o_direct_refused(layer_dir, monkeypatch):
    directory, manifests, tensors = layer_dir
    real_open = os.open

    def open_without_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_without_direct)
    store = DiskStore(directory, manifests)
    assert store.mode == "buffered"
    assert_same(read_unit(store, 4), tensors[4])
    with pytest.raises(SubspecError, match="refuses O_DIRECT"):
        DiskStore(directory, manifests, direct=True)


def test_disk_store_piece_error_propagates(layer_dir, monkeypatch):
    directory, manifests, _ = layer_dir
    real_preadv = os.preadv

    def failing_preadv(fd, buffers, offset):
        if offset >= manifests[2].data_offset + 2 * ALIGN:
            raise OSError(errno.EIO, "simulated I/O error")
        return real_preadv(fd, buffers, offset)

    with DiskStore(directory, manifests, chunk_bytes=ALIGN, io_threads=2) as store:
        monkeypatch.setattr(os, "preadv", failing_preadv)
        with pytest.raises(OSError, match="simulated I/O error"):
            read_unit(store, 2)


def test_disk_store_detects_file_changed_after_manifest(layer_dir):
    directory, manifests, _ = layer_dir
    with DiskStore(directory, manifests) as store:
        os.truncate(layer_path(directory, 1), manifests[1].file_bytes - ALIGN)
        with pytest.raises(SubspecError, match="size changed"):
            read_unit(store, 1)


def test_pinned_host_store_on_cpu():
    tensors = {u: make_layer(u) for u in (3, 7)}
    store = PinnedHostStore(tensors)
    assert store.pinned == torch.cuda.is_available()
    for unit in tensors:
        assert_same(read_unit(store, unit), tensors[unit])


def test_pinned_host_store_packs_from_loaders_once():
    calls = []

    def loader(unit):
        calls.append(unit)
        return make_layer(unit)

    store = PinnedHostStore({u: functools.partial(loader, u) for u in (2, 5)})
    assert calls == [2, 5]  # each unit read once, in order, and nothing written to disk
    assert store.host_bytes == sum(m.total_bytes for m in store.manifests.values())
    for unit in (2, 5):
        assert_same(read_unit(store, unit), make_layer(unit))
    store.close()


def test_measure_host_to_device_bandwidth_on_cpu():
    store = PinnedHostStore({u: make_layer(u) for u in range(3)})
    assert measure_slow_tier_bandwidth(store, 1 << 20, torch.device("cpu")) > 0


def test_measure_disk_bandwidth(layer_dir):
    directory, manifests, _ = layer_dir
    total = sum(m.total_bytes for m in manifests.values())
    assert measure_disk_bandwidth(directory, 2 * total, threads=2) > 0
    assert measure_disk_bandwidth(layer_path(directory, 0), 1) > 0


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


def test_lm_head_chunk_files_and_streamed_head(tmp_path):
    """The head is cut into chunks no larger than a layer buffer, written once, and streamed
    back chunk by chunk to the same logits as the whole head."""
    cfg = SimpleNamespace(  # the fields layer_nbytes and the chunking read
        hidden_size=64, vocab_size=1000, qkv_out=192, qkv_bias=False, qk_norm=False,
        head_dim=16, linear_shapes={"o": (64, 64)},
    )  # fmt: skip
    head = torch.randn(cfg.vocab_size, cfg.hidden_size)  # [V, H]
    calls = []

    def head_rows(a, b):
        calls.append((a, b))
        return head[a:b]

    rows = head_chunk_rows(cfg, torch.float32)
    manifests = ensure_head_files(head_rows, cfg, torch.float32, 3, tmp_path, None)
    assert list(manifests) == list(range(3, 3 + -(-cfg.vocab_size // rows)))
    # several chunks, each read as its own rows: the head is never whole in memory
    assert len(manifests) > 1 and len(calls) == len(manifests)
    assert all(b - a <= rows for a, b in calls)
    assert ensure_head_files(head_rows, cfg, torch.float32, 3, tmp_path, None).keys() == (
        manifests.keys()
    ) and len(calls) == len(manifests)  # cached: not read again
    store = DiskStore(tmp_path, manifests)
    with Prefetcher(store, list(manifests)) as pf:
        streamed = StreamedHead(StreamedLayers(pf, manifests), list(manifests))
        h = torch.randn(5, cfg.hidden_size)
        for _ in range(2):  # two passes through the cyclic prefetcher
            torch.testing.assert_close(streamed(h), h @ head.T)
    store.close()


def test_a_same_shaped_checkpoint_streams_its_own_layers(tmp_path):
    """Two checkpoints that differ only in their weights (same names, shapes and sizes) each
    stream their own layer files: the second must not find the first's cache and use it."""
    ones = write_tiny("llama", tmp_path / "norms-at-one", seed=0, perturb=False)
    other = write_tiny("llama", tmp_path / "norms-random", seed=0, perturb=True)
    for model_dir in (ones, other):
        streamed = make_runtime(model_dir, budget=minimum_budget(model_dir))
        resident = make_runtime(model_dir)
        assert streamed.placement.streams and not resident.placement.streams
        prompt = resident.encode_prompt("hello world", chat=True)
        assert torch.equal(
            prefill(streamed.target, prompt, 64), prefill(resident.target, prompt, 64)
        )

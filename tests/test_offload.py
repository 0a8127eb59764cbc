"""Layer files and slow stores (fast, CPU only, no network)."""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_same, make_layer, make_runtime, minimum_budget, write_tiny

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

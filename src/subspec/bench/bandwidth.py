"""Bandwidths this machine's run is bound by: cold disk reads of real layer files (CPU), or
copies of pinned host units to the GPU (CUDA), and DRAM reads (a draft step's bound)."""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import torch

from subspec.offload.layer_file import layer_path, read_manifests
from subspec.offload.stores import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_IO_THREADS,
    DiskStore,
    PinnedHostStore,
    SlowStore,
    drop_page_cache,
    read_buffer,
)


def _open_store(path: str | os.PathLike, chunk_bytes: int, io_threads: int) -> DiskStore:
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    manifests = read_manifests(directory)
    if not path.is_dir():
        manifests = {u: m for u, m in manifests.items() if layer_path(directory, u) == path}
    return DiskStore(directory, manifests, chunk_bytes=chunk_bytes, io_threads=io_threads)


def measure_disk_bandwidth(
    path_or_store: str | os.PathLike | DiskStore,
    nbytes: int,
    threads: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    io_threads: int = DEFAULT_IO_THREADS,
) -> float:
    """Cold read bandwidth (bytes/s) of real layer files, reading at least ``nbytes``.

    ``path_or_store``: a directory of layer files, one layer file, or a DiskStore (whose own
    mode, chunk size and io_threads are then used). Units are read in order, cyclically, by
    ``threads`` threads each with its own aligned buffer, as the prefetcher's reader threads
    do. O_DIRECT is used where the filesystem allows it; otherwise the files' cached pages are
    dropped first.
    """
    if isinstance(path_or_store, DiskStore):
        return _measure(path_or_store, nbytes, threads)
    with _open_store(path_or_store, chunk_bytes, io_threads) as store:
        return _measure(store, nbytes, threads)


def measure_slow_tier_bandwidth(store: SlowStore, nbytes: int, device: torch.device) -> float:
    """Bytes/s at which ``store`` fills fast-tier buffers on ``device``: cold disk reads for a
    DiskStore, host-to-device copies for a PinnedHostStore."""
    if isinstance(store, DiskStore):
        return measure_disk_bandwidth(store, nbytes)
    if isinstance(store, PinnedHostStore):
        return measure_host_to_device_bandwidth(store, nbytes, device)
    raise TypeError(f"no bandwidth probe for {type(store).__name__}")


def measure_host_to_device_bandwidth(
    store: PinnedHostStore, nbytes: int, device: str | torch.device
) -> float:
    """Copy rate (bytes/s) of ``store``'s units into one device buffer, cyclically, for at
    least ``nbytes``: the pinned host -> device rate the prefetcher's copies run at on CUDA
    (a plain memory copy on CPU). One warm-up copy is not counted."""
    device = torch.device(device)
    units = list(store.manifests)
    dst = torch.empty(max(store.nbytes(u) for u in units), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    store.read_into(units[0], dst, stream=stream)  # warm-up
    _synchronize(stream)
    done, i = 0, 0
    start = time.perf_counter()
    while done < nbytes:
        unit = units[i % len(units)]
        store.read_into(unit, dst, stream=stream)
        done, i = done + store.nbytes(unit), i + 1
    _synchronize(stream)
    return done / (time.perf_counter() - start)


def _synchronize(stream) -> None:
    if stream is not None:
        stream.synchronize()


def _measure(store: DiskStore, nbytes: int, threads: int) -> float:
    if store.mode == "buffered":
        for unit in store.manifests:
            drop_page_cache(store.path(unit))
    units = list(store.manifests)
    counter = _UnitCounter(units, store, nbytes)
    size = max(store.nbytes(u) for u in units)
    buffers = [read_buffer(size).fill_(0) for _ in range(threads)]  # touched: no page faults
    start = time.perf_counter()
    _run_threads([lambda b=b: _read_loop(store, counter, b) for b in buffers])
    return counter.done_bytes / (time.perf_counter() - start)


class _UnitCounter:
    """Hands out units cyclically to reader threads until ``target`` bytes are claimed."""

    def __init__(self, units: list[int], store: SlowStore, target: int):
        self._units, self._store, self._target = units, store, target
        self._lock = threading.Lock()
        self._next = 0
        self.claimed_bytes = 0
        self.done_bytes = 0

    def claim(self) -> int | None:
        """The next unit to read, or None once enough bytes have been claimed."""
        with self._lock:
            if self.claimed_bytes >= self._target:
                return None
            unit = self._units[self._next % len(self._units)]
            self._next += 1
            self.claimed_bytes += self._store.nbytes(unit)
            return unit

    def done(self, unit: int) -> None:
        """Count ``unit``'s bytes as read."""
        with self._lock:
            self.done_bytes += self._store.nbytes(unit)


def _read_loop(store: DiskStore, counter: _UnitCounter, buffer: torch.Tensor) -> None:
    while (unit := counter.claim()) is not None:
        store.read_into(unit, buffer)
        counter.done(unit)


def _run_threads(targets: list) -> None:
    errors: list[BaseException] = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # surfaced below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def measure_memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """DRAM read bandwidth (bytes/s) with torch's threads: the best of `repeats` sums over a
    buffer of `nbytes`, far larger than any cache (the bound a draft step is held to)."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)  # [nbytes / 4], pages touched
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


class MemoryProbe:
    """DRAM read bandwidth sampled through a run, between its generations. On a shared VM it
    swings from one second to the next (on the Zen 4 VM, 20 probes 1.5 s apart: 29-34 GB/s
    and now and then 51), so one probe tells its moment more than the run's; the bound is the
    median of the samples."""

    def __init__(self):
        self.samples: list[float] = []  # bytes/s, in the order taken

    def sample(self) -> None:
        self.samples.append(measure_memory_bandwidth())

    @property
    def bytes_per_s(self) -> float:
        return statistics.median(self.samples)

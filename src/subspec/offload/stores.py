"""Slow-tier stores: where units (one decoder layer's packed bytes) live between uses.

A store copies one unit's data region (see ``layer_file``) into a uint8 buffer on the fast
device. ``DiskStore`` reads layer files with O_DIRECT (the page cache never holds the model);
``PinnedHostStore`` keeps units in page-locked host RAM, packed straight from the checkpoint, and
copies them to a CUDA device asynchronously.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

from subspec.errors import SubspecError
from subspec.offload.layer_file import (
    ALIGN,
    LayerManifest,
    align_up,
    checksum,
    layer_path,
    pack_tensors,
    plan_layout,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 16 << 20
# Pieces of one unit in flight. Measured on this project's dev VM (virtio disk, ~1 GiB/s):
# one synchronous O_DIRECT read at a time gives ~0.6-0.75 GiB/s, 4 in flight ~0.95-1.0 GiB/s.
DEFAULT_IO_THREADS = 4


def aligned_empty(nbytes: int, alignment: int = ALIGN) -> torch.Tensor:
    """An uninitialised CPU uint8 tensor [nbytes] whose first byte is ``alignment``-aligned."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    shift = -raw.data_ptr() % alignment
    return raw[shift : shift + nbytes]  # the view keeps ``raw`` alive


HUGE_PAGE = 2 << 20


def read_buffer(nbytes: int) -> torch.Tensor:
    """A zeroed CPU uint8 tensor [nbytes] to read units into: 2 MiB-aligned, in fresh memory
    advised for transparent huge pages where the kernel offers them (THP "madvise" or "always";
    else plain pages). An O_DIRECT read maps its destination page by page: on the Zen 4 VM,
    the 1.5B's layers read alone into 4 KiB pages at 0.91-0.96 GB/s, into huge pages at
    2.33-2.47 GB/s; vanilla decoding at a 1.78 GB budget went from 1.09-1.17 to 1.18-1.46
    tok/s, and 4-row draft steps beside the reads took -2 to +1 ms more (against +10 to +20)."""
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # (shared memory has its own THP setting)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=private)  # page-aligned, untouched
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
        region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps ``region`` mapped
    shift = -raw.data_ptr() % HUGE_PAGE
    return raw[shift : shift + nbytes]


class SlowStore:
    """Interface of a slow tier: per-unit sizes, layouts and a copy into a fast buffer."""

    manifests: Mapping[int, LayerManifest]

    def nbytes(self, unit: int) -> int:
        """Bytes ``read_into`` writes for ``unit`` (its padded data region)."""
        return self.manifests[unit].total_bytes

    def check_device(self, device: torch.device) -> None:
        """Raise SubspecError if this store cannot fill buffers on ``device``."""

    def read_into(self, unit: int, dst: torch.Tensor, stream=None) -> None:
        """Copy ``unit``'s bytes into ``dst[:nbytes(unit)]`` (uint8, on the fast device).

        ``stream``: the CUDA stream to issue an asynchronous copy on (ignored on CPU).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the store's threads (the default store has none)."""


def _check_dst(dst: torch.Tensor, nbytes: int) -> None:
    if dst.dtype != torch.uint8 or dst.dim() != 1 or not dst.is_contiguous():
        raise SubspecError("destination must be a contiguous 1-D uint8 tensor")
    if dst.numel() < nbytes:
        raise SubspecError(f"destination has {dst.numel()} bytes, the unit needs {nbytes}")


def drop_page_cache(path: str | os.PathLike) -> None:
    """Ask the kernel to drop ``path``'s clean pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class DiskStore(SlowStore):
    """Units stored as layer files ``layer_NNNNN.bin`` in ``directory``; CPU destinations only.

    ``direct``: None probes O_DIRECT and falls back to buffered reads if the filesystem refuses
    it (EINVAL, e.g. tmpfs); True requires O_DIRECT; False forces buffered reads. Buffered reads
    are followed by POSIX_FADV_DONTNEED so the page cache does not keep the model. ``mode`` is
    "direct" or "buffered". Each unit is read in pieces of at most ``chunk_bytes`` through
    ``os.preadv`` (which releases the GIL, so reads overlap compute in other threads), with up
    to ``io_threads`` pieces in flight at once: one synchronous read at a time leaves the disk
    idle between pieces. Buffered reads stay sequential (kernel readahead does better alone than
    split up). ``close()`` stops the I/O threads.

    The first read of each unit in this store's life is checked against the CRC-32 its file's
    header carries, on the reading thread (the check releases the GIL, so it overlaps compute
    as the read does). A mismatch is logged with both sums and the unit is written anew by
    ``rebuild`` (unit -> its new manifest) and read again; without ``rebuild``, or when the new
    file does not match either, the read raises SubspecError.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        manifests: Mapping[int, LayerManifest],
        direct: bool | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        io_threads: int = DEFAULT_IO_THREADS,
        rebuild: Callable[[int], LayerManifest] | None = None,
    ):
        if chunk_bytes <= 0 or chunk_bytes % ALIGN:
            raise SubspecError(f"chunk_bytes must be a positive multiple of {ALIGN}")
        if io_threads < 1:
            raise SubspecError("io_threads must be >= 1")
        if not manifests:
            raise SubspecError(f"no layer files for {directory}")
        self.directory = Path(directory)
        self.manifests = dict(manifests)
        self.chunk_bytes, self.io_threads = chunk_bytes, io_threads
        self.rebuild = rebuild
        self.verified: set[int] = set()  # units whose bytes matched their checksum once
        self.mode = self._choose_mode(direct)
        parallel = io_threads > 1 and self.mode == "direct"
        self._pool = ThreadPoolExecutor(io_threads, "subspec-io") if parallel else None

    def path(self, unit: int) -> Path:
        """The layer file of ``unit``."""
        return layer_path(self.directory, unit)

    def _choose_mode(self, direct: bool | None) -> str:
        if direct is False:
            return "buffered"
        if _direct_io_works(self.path(next(iter(self.manifests)))):
            return "direct"
        if direct:
            raise SubspecError(f"{self.directory}: the filesystem refuses O_DIRECT")
        return "buffered"

    def check_device(self, device: torch.device) -> None:
        """DiskStore fills CPU buffers only."""
        if torch.device(device).type != "cpu":
            raise SubspecError("DiskStore reads into CPU buffers only; stage through host RAM")

    def read_into(self, unit: int, dst: torch.Tensor, stream=None) -> None:
        """Read ``unit``'s data region from its file into CPU ``dst`` (4096-aligned if direct),
        checked against its checksum the first time (see the class docstring)."""
        self._read(unit, dst)
        if unit in self.verified:
            return
        if self._matches(unit, dst):
            self.verified.add(unit)
            return
        if self.rebuild is None:
            raise SubspecError(f"{self.path(unit)}: checksum mismatch (a corrupted file)")
        manifest = self.rebuild(unit)
        if manifest.total_bytes != self.manifests[unit].total_bytes:
            raise SubspecError(f"{self.path(unit)}: rebuilt with another size")
        self.manifests[unit] = manifest
        self._read(unit, dst)
        if not self._matches(unit, dst):
            raise SubspecError(f"{self.path(unit)}: checksum mismatch after rebuilding it")
        self.verified.add(unit)

    def _matches(self, unit: int, dst: torch.Tensor) -> bool:
        manifest = self.manifests[unit]
        got = checksum(memoryview(dst[: manifest.total_bytes].numpy()))
        if got != manifest.crc32:
            log.warning("%s: its data's CRC-32 is %08x, its header says %08x (corrupted)",
                        self.path(unit), got, manifest.crc32 or 0)  # fmt: skip
        return got == manifest.crc32

    def _read(self, unit: int, dst: torch.Tensor) -> None:
        manifest = self.manifests[unit]
        _check_dst(dst, manifest.total_bytes)
        if dst.device.type != "cpu":
            raise SubspecError("DiskStore reads into CPU buffers only")
        direct = self.mode == "direct"
        if direct and dst.data_ptr() % ALIGN:
            raise SubspecError("O_DIRECT needs a 4096-aligned destination (use aligned_empty)")
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        fd = os.open(self.path(unit), flags)
        try:
            self._read_fd(fd, unit, dst)
            if not direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def _read_fd(self, fd: int, unit: int, dst: torch.Tensor) -> None:
        manifest = self.manifests[unit]
        if os.fstat(fd).st_size != manifest.file_bytes:
            raise SubspecError(f"{self.path(unit)}: size changed since its manifest was read")
        view = memoryview(dst[: manifest.total_bytes].numpy())
        if self._pool is None:
            _pread_full(fd, view, manifest.data_offset, self.chunk_bytes)
            return
        # at least io_threads pieces when the unit is large enough, each <= chunk_bytes
        piece = min(self.chunk_bytes, align_up(-(-len(view) // self.io_threads)))
        futures = [
            self._pool.submit(_pread_full, fd, view[s : s + piece], manifest.data_offset + s, piece)
            for s in range(0, len(view), piece)
        ]
        wait(futures)  # every piece is done with ``fd`` before the caller closes it
        for f in futures:
            f.result()  # re-raises a failed piece's error

    def close(self) -> None:
        """Stop the I/O threads (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pread_full(fd: int, view: memoryview, offset: int, chunk: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` in ``chunk``-byte preadv calls."""
    pos = 0
    while pos < len(view):
        got = os.preadv(fd, [view[pos : pos + chunk]], offset + pos)
        if got == 0:
            raise SubspecError(f"unexpected end of file at byte {offset + pos}")
        pos += got


def _direct_io_works(path: Path) -> bool:
    """Whether ``path`` can be opened and read with O_DIRECT."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    try:
        os.preadv(fd, [memoryview(aligned_empty(ALIGN).numpy())], 0)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)


class PinnedHostStore(SlowStore):
    """Units packed into host RAM with the layer-file layout, page-locked when CUDA exists.

    ``units``: unit -> its tensors ({name: tensor}), or a function returning them, called once
    per unit in order and dropped after packing: host RAM then holds the packed units plus one
    unit's tensors at a time, and nothing touches the disk. Each unit gets its own 4096-aligned
    buffer of exactly its size, page-locked with cudaHostRegister (torch's pinned allocator
    would round every block up to a power of two). ``read_into`` copies a unit to the
    destination, asynchronously on ``stream`` when the destination is on CUDA. ``close()``
    unregisters the buffers.
    """

    def __init__(self, units: Mapping[int, Mapping[str, torch.Tensor] | Callable[[], Mapping]]):
        self.pinned = torch.cuda.is_available()
        self.manifests, self._host = {}, {}
        for unit, source in units.items():
            tensors = source() if callable(source) else source
            manifest = plan_layout(tensors)
            host = aligned_empty(manifest.total_bytes)
            pack_tensors(tensors, manifest, host)
            del tensors
            if self.pinned:
                _host_register(host)
            self.manifests[unit], self._host[unit] = manifest, host

    @property
    def host_bytes(self) -> int:
        """Host RAM the packed units occupy."""
        return sum(h.numel() for h in self._host.values())

    def read_into(self, unit: int, dst: torch.Tensor, stream=None) -> None:
        """Copy ``unit`` into ``dst``: on CUDA, non-blocking on ``stream`` (or the current one)."""
        src = self._host[unit]
        _check_dst(dst, src.numel())
        if dst.device.type == "cuda":
            with torch.cuda.stream(stream):
                dst[: src.numel()].copy_(src, non_blocking=True)
        else:
            dst[: src.numel()].copy_(src)

    def close(self) -> None:
        """Unregister the page-locked buffers (idempotent); the store is unusable after."""
        if self.pinned:
            for host in self._host.values():
                torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
        self._host, self.pinned = {}, False


def _host_register(host: torch.Tensor) -> None:
    """Page-lock ``host``'s memory for asynchronous copies (cudaHostRegister)."""
    err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 0)
    if int(err) != 0:
        raise SubspecError(
            f"cudaHostRegister of {host.numel()} bytes failed (error {int(err)}): "
            "host RAM cannot be page-locked (check ulimit -l)"
        )

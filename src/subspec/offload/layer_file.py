"""One decoder layer's weights in one file, laid out for direct (O_DIRECT) reads.

File layout (every boundary a multiple of ``ALIGN`` = 4096 bytes)::

    [0, data_offset)                 header: MAGIC, u64 little-endian JSON length, JSON, zeros
    [data_offset, data_offset + total_bytes)
                                     data region: each tensor's raw bytes at its ``offset``
                                     (relative to the data region), zeros in between and after

The JSON holds the tensors' layout and ``crc32``, the CRC-32 of the whole data region, which a
reader checks the first time it reads the file (``DiskStore``).

A reader copies the whole data region into one uint8 buffer and takes zero-copy views of it
with :func:`tensors_from_buffer`; the same layout is used in host memory by ``PinnedHostStore``.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from subspec.errors import SubspecError
from subspec.files import atomic_output
from subspec.sizes import ALIGN, align_up

MAGIC = b"SUBSPEC\x01"
_LEN = struct.Struct("<Q")
_WRITE_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the data region."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the data region, multiple of ALIGN
    nbytes: int


@dataclass(frozen=True)
class LayerManifest:
    """The layout of one unit: its tensors and the size of its (padded) data region."""

    tensors: tuple[TensorEntry, ...]
    total_bytes: int  # data region size, multiple of ALIGN: the bytes a reader must fetch
    data_offset: int = 0  # header size in a file (0 for an in-memory layout)
    crc32: int | None = None  # of the data region, in a file (None for an in-memory layout)

    @property
    def file_bytes(self) -> int:
        """Size of the file holding this unit."""
        return self.data_offset + self.total_bytes

    def to_json(self) -> dict:
        """The JSON-serialisable form stored in the file header (without data_offset)."""
        return {
            "total_bytes": self.total_bytes,
            "crc32": self.crc32,
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "offset": t.offset,
                    "nbytes": t.nbytes,
                }
                for t in self.tensors
            ],
        }


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SubspecError(f"unknown dtype {name!r} in layer manifest")
    return dtype


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as a flat CPU uint8 tensor (a view when ``t`` is contiguous on CPU)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def plan_layout(tensors: Mapping[str, torch.Tensor]) -> LayerManifest:
    """Assign each tensor an ALIGN-aligned offset, in insertion order; nothing is copied."""
    entries, offset = [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        dtype = str(t.dtype).removeprefix("torch.")
        entries.append(TensorEntry(name, dtype, tuple(t.shape), offset, nbytes))
        offset = align_up(offset + nbytes)
    return LayerManifest(tuple(entries), offset)


def pack_tensors(
    tensors: Mapping[str, torch.Tensor], manifest: LayerManifest, out: torch.Tensor
) -> None:
    """Copy ``tensors`` into the uint8 buffer ``out`` (>= total_bytes) at the manifest offsets."""
    _check_buffer(out, manifest)
    for entry in manifest.tensors:
        out[entry.offset : entry.offset + entry.nbytes].copy_(_raw_bytes(tensors[entry.name]))


def _header(manifest: LayerManifest) -> bytes:
    body = json.dumps(manifest.to_json(), separators=(",", ":")).encode()
    head = MAGIC + _LEN.pack(len(body)) + body
    return head + bytes(align_up(len(head)) - len(head))


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data[:_WRITE_CHUNK]) :]


def _body(tensors: Mapping[str, torch.Tensor], manifest: LayerManifest) -> Iterator[memoryview]:
    """The data region, piece by piece: the tensors' bytes and the zeros between them."""
    pos = 0
    for entry in manifest.tensors:
        yield memoryview(bytes(entry.offset - pos))
        yield memoryview(_raw_bytes(tensors[entry.name]).numpy())
        pos = entry.offset + entry.nbytes
    yield memoryview(bytes(manifest.total_bytes - pos))


def checksum(data, crc: int = 0) -> int:
    """CRC-32 of `data` (a buffer) continuing `crc`: zlib's, which releases the GIL."""
    return zlib.crc32(data, crc)


def write_layer_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> LayerManifest:
    """Write ``tensors`` (name -> tensor, any dtypes) to ``path`` atomically; return the manifest.

    The file is written to a temporary name, fsynced and renamed over ``path``; its pages are
    then dropped from the page cache so writing a model does not leave it cached in RAM.
    """
    path = Path(path)
    layout = plan_layout(tensors)
    crc = 0
    for piece in _body(tensors, layout):
        crc = checksum(piece, crc)
    layout = LayerManifest(layout.tensors, layout.total_bytes, crc32=crc)
    header = _header(layout)
    manifest = LayerManifest(layout.tensors, layout.total_bytes, len(header), crc)
    with atomic_output(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, memoryview(header))
            for piece in _body(tensors, manifest):
                _write_all(fd, piece)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return manifest


def _parse_header(path: Path, head: bytes) -> LayerManifest:
    if head[: len(MAGIC)] != MAGIC or len(head) < len(MAGIC) + _LEN.size:
        raise SubspecError(f"{path}: not a subspec layer file (bad magic)")
    (length,) = _LEN.unpack_from(head, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    raw = json.loads(head[start : start + length])
    entries = tuple(
        TensorEntry(e["name"], e["dtype"], tuple(e["shape"]), e["offset"], e["nbytes"])
        for e in raw["tensors"]
    )
    if not isinstance(raw.get("crc32"), int):
        raise SubspecError(f"{path}: no checksum in its header (a file of an older format)")
    return LayerManifest(entries, raw["total_bytes"], align_up(start + length), raw["crc32"])


def _validate(path: Path, manifest: LayerManifest, size: int) -> None:
    if size != manifest.file_bytes:
        raise SubspecError(
            f"{path}: file is {size} bytes but its manifest says {manifest.file_bytes} "
            "(truncated or corrupt layer file)"
        )
    for e in manifest.tensors:
        expected = _dtype(e.dtype).itemsize * _numel(e.shape)
        if e.offset % ALIGN or e.nbytes != expected or e.offset + e.nbytes > manifest.total_bytes:
            raise SubspecError(f"{path}: inconsistent manifest entry {e.name!r}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_manifest(path: str | os.PathLike) -> LayerManifest:
    """Read and validate the manifest of a layer file (raises SubspecError if truncated)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(MAGIC) + _LEN.size)
        if len(head) == len(MAGIC) + _LEN.size and head.startswith(MAGIC):
            head += f.read(_LEN.unpack_from(head, len(MAGIC))[0])
    try:
        manifest = _parse_header(path, head)
    except (ValueError, KeyError, TypeError) as e:
        raise SubspecError(f"{path}: corrupt layer-file header ({e})") from e
    _validate(path, manifest, size)
    return manifest


def layer_path(directory: str | os.PathLike, unit: int) -> Path:
    """The conventional file name of ``unit`` in a directory of layer files."""
    return Path(directory) / f"layer_{unit:05d}.bin"


def read_manifests(directory: str | os.PathLike) -> dict[int, LayerManifest]:
    """Manifests of every ``layer_NNNNN.bin`` in ``directory``, keyed by unit number."""
    paths = sorted(Path(directory).glob("layer_*.bin"))
    return {int(p.stem.removeprefix("layer_")): read_manifest(p) for p in paths}


def _check_buffer(buffer: torch.Tensor, manifest: LayerManifest) -> None:
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
        raise SubspecError("layer buffer must be a contiguous 1-D uint8 tensor")
    if buffer.numel() < manifest.total_bytes:
        raise SubspecError(f"layer buffer has {buffer.numel()} bytes, needs {manifest.total_bytes}")


def read_tensor(path: str | os.PathLike, manifest: LayerManifest, name: str) -> torch.Tensor:
    """One tensor of a layer file, read on its own (a copy; for small ones)."""
    entry = next(e for e in manifest.tensors if e.name == name)
    with open(path, "rb") as f:
        f.seek(manifest.data_offset + entry.offset)
        data = bytearray(f.read(entry.nbytes))
    if len(data) != entry.nbytes:
        raise SubspecError(f"{path}: truncated tensor {name}")
    return torch.frombuffer(data, dtype=torch.uint8).view(_dtype(entry.dtype)).view(entry.shape)


def tensors_from_buffer(buffer: torch.Tensor, manifest: LayerManifest) -> dict[str, torch.Tensor]:
    """Zero-copy views of the unit's tensors inside ``buffer`` (uint8 [>= total_bytes]).

    The views alias ``buffer``: they are valid only while the buffer holds this unit.
    """
    _check_buffer(buffer, manifest)
    return {
        e.name: buffer[e.offset : e.offset + e.nbytes].view(_dtype(e.dtype)).view(e.shape)
        for e in manifest.tensors
    }

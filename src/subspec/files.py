"""File helpers every cache shares: one safetensors header reader, one atomic write, and
the marks of a finished install."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from subspec.errors import SubspecError

MARKER = ".complete"  # written last into an installed model's directory (pulled or built)


def cache_root() -> Path:
    """Where subspec keeps models, datasets and offload files: $SUBSPEC_HOME or ~/.cache/subspec."""
    home = os.environ.get("SUBSPEC_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "subspec"


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(header length, header dict) of a safetensors file, checked against the file's size.

    The header maps tensor names to {"dtype", "shape", "data_offsets"} (offsets relative to
    the data section, which starts at byte 8 + header length), plus "__metadata__"."""
    try:
        raw = _header_bytes(path)
        header = json.loads(raw)
        size = os.path.getsize(path)
    except (OSError, ValueError, struct.error) as e:
        raise SubspecError(f"corrupted or unreadable safetensors file {path}: {e}") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                   default=0)  # fmt: skip
    if 8 + len(raw) + data_end > size:
        raise SubspecError(f"truncated safetensors file {path}: {size} bytes, header needs more")
    return len(raw), header


# safetensors dtype -> torch dtype name
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
             "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
             "BOOL": "bool"}  # fmt: skip


class SafetensorsFile:
    """A safetensors file whose tensors are read with pread into fresh tensors, not through a
    memory map: reading a tensor then adds only that tensor to the process's RSS. (Pages of a
    mapped file count in RSS while it stays mapped: loading a 7B through maps peaked 2.8 GB
    above its budget.) The page cache still serves the reads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        header_len, self.header = read_safetensors_header(self.path)
        self.data_start = 8 + header_len
        self.metadata: dict[str, str] = self.header.pop("__metadata__", None) or {}
        self._fd = os.open(self.path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str):
        """The tensor `name` (a KeyError if absent), in a tensor of its own."""
        return self.get_rows(name, 0, None)

    def get_rows(self, name: str, start: int, end: int | None):
        """Rows [start, end) of tensor `name` along its first dimension (all to the end for
        None), in a tensor of their own: only those bytes are read."""
        import torch

        info = self.header[name]
        begin, finish = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise SubspecError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        shape, torch_dtype = info["shape"], getattr(torch, dtype)
        row_bytes = torch.empty(0, dtype=torch_dtype).element_size() * math.prod(shape[1:])
        if row_bytes * math.prod(shape[:1]) != finish - begin:
            raise SubspecError(f"{self.path}: tensor {name}'s offsets do not match its shape")
        rows = range(shape[0])[start:end] if shape else range(1)
        t = torch.empty([len(rows), *shape[1:]] if shape else [], dtype=torch_dtype)
        self._read_into(t, self.data_start + begin + rows.start * row_bytes, name)
        return t

    def _read_into(self, t, offset: int, name: str) -> None:
        import torch

        view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.nbytes else memoryview(b"")
        done = 0
        while done < t.nbytes:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise SubspecError(f"truncated safetensors file {self.path} (tensor {name})")
            done += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _header_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > os.fstat(f.fileno()).st_size - 8:
            raise ValueError(f"header length {n} runs past the end of the file")
        return f.read(n)


FINGERPRINT_SAMPLES = 256  # evenly spaced 4 KB samples of each file's data, with its ends
_SAMPLE_BYTES = 4096


def safetensors_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over each safetensors file's name, size, header (tensor names, dtypes, shapes,
    offsets) and FINGERPRINT_SAMPLES samples of its data (1 MB a file, read in milliseconds):
    it tells apart checkpoints of the same shapes (a fine-tune changes nearly every weight,
    so every sample), while a `touch`, a copy or a move of the directory keeps it."""
    digest = hashlib.sha256()
    for path in sorted((Path(p) for p in paths), key=lambda p: p.name):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        digest.update(_header_bytes(path))
        with open(path, "rb") as f:
            for i in range(FINGERPRINT_SAMPLES + 1):
                f.seek(max(0, (size - _SAMPLE_BYTES) * i // FINGERPRINT_SAMPLES))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


@contextmanager
def atomic_output(path: Path, *, durable: bool = True) -> Iterator[Path]:
    """A temporary sibling of `path` (a file or a directory) for the block to write; renamed
    over `path` only when the block succeeds, removed when it fails, so a half-written entry
    is never seen under `path`. `durable`: fsync the file and the directory first."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if durable and tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        replace_path(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def replace_path(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path`, also when both are directories (the old one is removed)."""
    if tmp.is_dir() and path.exists():  # a directory cannot be renamed over a full one
        stale = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.stale")
        os.replace(path, stale)
        os.replace(tmp, path)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, path)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_stale(root: Path, name: str) -> None:
    """Remove the temporary directories `.NAME.tmp-PID-*` under `root` left by installs of
    `name` (a pulled or built model) whose process has died."""
    for path in root.glob(f".{name}.tmp-*"):
        pid = path.name[len(f".{name}.tmp-") :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

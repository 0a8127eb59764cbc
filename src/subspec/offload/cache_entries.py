"""The offload cache's entries: one directory per checkpoint and dtype under
$SUBSPEC_HOME/offload (layer files, substitutes, residual files, the draft head), each with an
`entry.json` saying what it is for, so that `subspec cache list` can show it and `subspec
cache prune` can delete the entries no checkpoint uses any more."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from subspec.files import atomic_output, cache_root, safetensors_fingerprint

ENTRY_FILE = "entry.json"
ENTRY_FORMAT = 1  # the layout of an entry's files; an entry of another format is an orphan


def offload_root() -> Path:
    return cache_root() / "offload"


def record_entry(directory: Path, model: str, model_dir: Path, dtype: str) -> None:
    """Write `directory`'s entry.json: the cache format and the model that uses it, the last
    one where copies of a checkpoint share it (an entry is named by the checkpoint's content)."""
    path = directory / ENTRY_FILE
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        created = datetime.now(UTC).isoformat(timespec="seconds")
        entry = {"format": ENTRY_FORMAT, "dtype": dtype, "created": created}
    if entry.get("model_dir") == str(model_dir) and entry.get("format") == ENTRY_FORMAT:
        return
    entry.update(model=model, model_dir=str(model_dir))
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, durable=False) as tmp:
        tmp.write_text(json.dumps(entry, indent=1) + "\n")


@dataclass
class Entry:
    """One offload cache entry and what `prune` would make of it."""

    path: Path
    bytes: int
    model: str  # the model it was made for ("?" without an entry.json)
    parts: list[str]  # its files and folders, e.g. ['layers', 'substitutes-b4-g64-hqq']
    orphan_reason: str | None  # None: its checkpoint is there and unchanged

    @property
    def orphan(self) -> bool:
        return self.orphan_reason is not None


def entries() -> list[Entry]:
    """Every entry under offload/, largest first."""
    root = offload_root()
    found = [_entry(d) for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda e: e.bytes, reverse=True)


def prune(dry_run: bool = False) -> list[Entry]:
    """Delete the orphaned entries (all of them with `dry_run` False); returns them."""
    orphans = [e for e in entries() if e.orphan]
    if not dry_run:
        for e in orphans:
            shutil.rmtree(e.path, ignore_errors=True)
    return orphans


def _entry(directory: Path) -> Entry:
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    parts = sorted(p.name for p in directory.iterdir() if p.name != ENTRY_FILE)
    try:
        info = json.loads((directory / ENTRY_FILE).read_text())
    except (OSError, ValueError):
        return Entry(directory, size, "?", parts, "no entry.json (made by an older subspec)")
    return Entry(directory, size, info.get("model", "?"), parts, _orphan_reason(directory, info))


def _orphan_reason(directory: Path, info: dict) -> str | None:
    if info.get("format") != ENTRY_FORMAT:
        return f"cache format {info.get('format')}, this subspec writes {ENTRY_FORMAT}"
    model_dir = Path(info.get("model_dir", ""))
    shards = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not shards:
        return f"its checkpoint {model_dir} is gone"
    fingerprint = safetensors_fingerprint(shards)[:16]
    if not directory.name.startswith(f"{fingerprint}-"):
        return f"its checkpoint {model_dir} has changed"
    return None

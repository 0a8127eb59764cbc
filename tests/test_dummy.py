"""`dummy:NAME` models: right tensors for every architecture, deterministic, atomic, lossless.

Builds use the smallest dummy (smollm2, 135M parameters), cut to a few layers where the test
allows, in a temporary SUBSPEC_HOME.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from subspec.app.cli import main
from subspec.errors import SubspecError
from subspec.hub import dummy
from subspec.hub import models as hub
from subspec.model.config import ModelConfig

SMALL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("subspec-home")


@pytest.fixture(autouse=True)
def _cache_in_home(home, monkeypatch):
    monkeypatch.setenv("SUBSPEC_HOME", str(home))


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("name", dummy.dummy_names())
def test_tensor_plan_matches_transformers_and_subspec(name, tmp_path):
    """The planned tensors are exactly the HF model's, and subspec reads the config."""
    config = dummy.hf_config(dummy.catalog()[name], num_layers=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        expected.pop("lm_head.weight")
    assert {n: shape for n, shape, _ in dummy.tensor_plan(config)} == expected
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.num_layers == 2 and cfg.vocab_size == config["vocab_size"]


def test_catalogue_models_are_all_dummies():
    assert set(hub.catalog()) - {"gemma3-270m"} <= set(dummy.dummy_names())


@pytest.mark.parametrize("name", [SMALL, "llama-3.1-8b"])
def test_tokenizer_covers_the_vocab_and_stops_at_eos(name):
    entry = dummy.catalog()[name]
    tok = dummy.build_tokenizer(entry["config"]["vocab_size"], entry["special_tokens"])
    assert len(tok) == entry["config"]["vocab_size"]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in entry["generation_eos"]
    assert entry["config"]["eos_token_id"] < len(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == entry["special_tokens"]["<|im_start|>"]
    assert tok.decode(ids) == text
    assert tok.decode([len(tok) - 1]) == f"[{len(tok) - 1}]"


def test_build_loads_with_transformers_and_gives_finite_logits():
    path = dummy.ensure_dummy(SMALL, progress=False, num_layers=3)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    logits = out.logits.float()
    assert torch.isfinite(logits).all() and 0.5 < logits.std() < 2
    for hidden in out.hidden_states:
        assert 0.01 < hidden.float().pow(2).mean().sqrt() < 4


def test_builds_are_deterministic(home, tmp_path, monkeypatch):
    first = dummy.ensure_dummy(SMALL, progress=False, num_layers=1)
    monkeypatch.setenv("SUBSPEC_HOME", str(tmp_path))
    second = dummy.ensure_dummy(SMALL, progress=False, num_layers=1)
    assert first != second and _digests(first) == _digests(second)


def test_shards_stay_under_the_limit():
    plan = dummy.tensor_plan(dummy.hf_config(dummy.catalog()["qwen2.5-7b"]))
    shards = dummy.shard_plan(plan)
    sizes = [sum(2 * torch.Size(shape).numel() for _, shape, _ in s) for s in shards]
    assert len(shards) > 1 and max(sizes) <= 2 * 10**9
    assert [spec for shard in shards for spec in shard] == plan


def test_unknown_name_is_a_one_line_error(capsys):
    with pytest.raises(SubspecError, match="known: dummy:smollm2") as info:
        hub.resolve_model("dummy:gpt-17")
    assert "\n" not in str(info.value) and "gpt-17" in str(info.value)
    assert main(["generate", "--model", "dummy:gpt-17", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dummy:qwen2.5-7b" in err


def test_interrupted_build_leaves_nothing_used_later(monkeypatch):
    path = dummy.dummy_dir(SMALL, num_layers=2)
    stale = path.parent / f".{path.name}.tmp-999999999-x"  # left by a killed build
    stale.mkdir(parents=True)
    path.mkdir()
    (path / "config.json").write_text("{}")  # a half-written directory, without marker

    def interrupt(name, plan, out, say):
        (out / "model-00001-of-00001.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(dummy, "write_weights", interrupt)
        with pytest.raises(KeyboardInterrupt):
            dummy.ensure_dummy(SMALL, progress=False, num_layers=2)
    assert not dummy.is_built(path)
    assert [p.name for p in path.parent.glob(f".{path.name}.tmp-*")] == []
    assert dummy.ensure_dummy(SMALL, progress=False, num_layers=2) == path
    assert dummy.is_built(path) and (path / "model.safetensors.index.json").is_file()
    assert ModelConfig.from_dir(path).num_layers == 2


def _generate(capsys, method: str) -> dict:
    argv = ["generate", "--model", f"dummy:{SMALL}", "--dtype", "float32", "--memory-budget",
            "400MB", "--json", "--max-new-tokens", "8", "--prompt", "hi", "--method", method,
            "--bits", "4", "--no-hqq-optimize"]  # fmt: skip
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_subspec_on_a_streamed_dummy_is_lossless(capsys):
    vanilla = _generate(capsys, "vanilla")
    subspec = _generate(capsys, "subspec")
    placement = subspec["stats"]["placement"]
    assert placement["streamed_layers"] and placement["resident_layers"]
    assert len(vanilla["token_ids"]) == 8
    assert subspec["token_ids"] == vanilla["token_ids"]


def test_models_list_shows_the_dummies(capsys):
    dummy.ensure_dummy(SMALL, progress=False)
    assert main(["models", "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "not built" in lines["dummy:qwen2.5-7b"]
    assert " built " in lines[f"dummy:{SMALL}"] and "llama" in lines[f"dummy:{SMALL}"]

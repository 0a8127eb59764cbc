"""The HF transformers + accelerate disk-offload baseline on a tiny random Llama (no network)."""

from __future__ import annotations

import os

import pytest
import torch

from subspec.bench import hf_baseline
from subspec.errors import SubspecError

PROMPTS = [[5, 17, 42, 99, 7], [1, 250, 3]]
MAX_NEW = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved 4-layer random Llama and its in-memory greedy outputs from ``generate``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, eos_token_id=2, bos_token_id=1,
        tie_word_embeddings=False, initializer_range=0.3,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    want = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_NEW)  # fmt: skip
        want.append(out[0, len(p) :].tolist())
    return path, cfg, model, want


def _budget_for(cfg, model, cpu_layers: float) -> int:
    """A budget with room for ``cpu_layers`` resident layers next to the streaming overheads."""
    layer = model.model.layers[0]
    layer_bytes = sum(p.nbytes for p in layer.parameters())
    staging = max(p.nbytes for p in layer.parameters())  # the largest linear's weight
    fixed = sum(p.nbytes for p in model.parameters()) - cfg.num_hidden_layers * layer_bytes
    longest = max(len(p) for p in PROMPTS)
    allowance = hf_baseline.runtime_allowance(cfg, torch.float32, longest + MAX_NEW, longest)
    return int(fixed + allowance + staging + cpu_layers * layer_bytes)


def _run(path, budget, tmp_path, evict=True):
    return hf_baseline.run_hf(path, PROMPTS, MAX_NEW, budget, torch.float32, tmp_path / "off",
                              {2}, evict=evict)  # fmt: skip


def test_offloaded_outputs_equal_generate_and_eviction_runs(tiny, tmp_path, monkeypatch):
    path, cfg, model, want = tiny
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(hf_baseline.os, "posix_fadvise", lambda *a: (calls.append(a), real(*a)))
    res = _run(path, _budget_for(cfg, model, 1.5), tmp_path)
    assert res["outputs"] == want
    place = res["placement"]
    assert (place["cpu_layers"], place["disk_layers"]) == (1, 3)
    assert place["device_map"]["model.layers.0"] == "cpu"
    assert place["device_map"]["model.layers.3"] == "disk"
    assert res["bytes_offloaded"] == place["disk_bytes"] > 0
    assert res["offload"]["evicted_bytes"] > 0
    assert len(calls) == res["offload"]["fadvise_calls"] > 0
    assert all(c[3] == os.POSIX_FADV_DONTNEED for c in calls)
    assert res["new_tokens"] == sum(len(o) for o in want)
    assert res["decode_s"] > 0 and res["prefill_s"] > 0 and res["peak_rss_bytes"] > 0
    assert list((tmp_path / "off").iterdir()) == []  # the offload folder is cleaned up


def test_no_eviction_and_no_budget(tiny, tmp_path):
    path, cfg, model, want = tiny
    res = _run(path, _budget_for(cfg, model, 0), tmp_path, evict=False)
    assert res["outputs"] == want
    assert res["placement"]["disk_layers"] == 4
    assert res["offload"]["fadvise_calls"] == 0
    res = _run(path, None, tmp_path)
    assert res["outputs"] == want
    assert res["placement"]["disk_layers"] == 0 and res["bytes_offloaded"] == 0


def test_budget_below_minimum_is_an_error(tiny, tmp_path):
    path, cfg, model, _ = tiny
    with pytest.raises(SubspecError, match="below"):
        _run(path, _budget_for(cfg, model, -0.5), tmp_path)

"""End-to-end claims on real pretrained models (pulled from the package registry once)."""

import pytest
import torch
from helpers import generate, make_runtime
from transformers import AutoModelForCausalLM

from subspec.config import SpecConfig
from subspec.files import cache_root
from subspec.hub import models as hub
from subspec.model.checkpoint import Checkpoint
from subspec.model.forward import causal_mask
from subspec.runtime.weights import fingerprint

pytestmark = pytest.mark.slow  # the models come from the package registry on first use

PROMPT = "Explain in two sentences why the sky is blue."


def engine_for(model_dir, methods=("vanilla",), budget=None, dtype="float32", spec=None):
    spec = spec or SpecConfig(depth=6, width=2)
    return make_runtime(model_dir, methods, budget, dtype, spec, context=512)


def greedy(runtime, method, max_new=32):
    return generate(runtime, method, PROMPT, max_new)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_logits_match_transformers_fp32(name):
    model_dir = hub.resolve_model(name, progress=False)
    engine = engine_for(model_dir)
    ids = engine.encode_prompt(PROMPT, chat=True)
    t = len(ids)
    tokens, pos = torch.tensor(ids), torch.arange(t)
    ours = engine.target.logits(
        engine.target.forward(tokens, pos, pos, causal_mask(0, t, "cpu"), t)
    )
    del engine
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(tokens[None]).logits[0].float()
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 2e-3 * max(1.0, float(ref.abs().max()) / 10)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir):
    return greedy(engine_for(smollm2_dir), "vanilla")[0]


@pytest.fixture(scope="module")
def smollm2_full_bytes(smollm2_dir):
    return engine_for(smollm2_dir).placement.resident_bytes


def test_streamed_greedy_equals_resident(smollm2_dir, smollm2_reference, smollm2_full_bytes):
    """fp32, a budget of a third of the model: most layers stream from disk."""
    budget = smollm2_full_bytes // 3
    engine = engine_for(smollm2_dir, budget=budget)
    p = engine.placement
    assert len(p.streamed_layers) > len(p.resident_layers) and p.resident_bytes <= budget
    tokens, stats = greedy(engine, "vanilla")
    assert tokens == smollm2_reference
    assert stats.memory.bytes_streamed >= stats.target_forwards * len(p.streamed_layers)


def test_subspec_greedy_equals_vanilla(smollm2_dir, smollm2_reference, smollm2_full_bytes):
    engine = engine_for(smollm2_dir, ("subspec",), budget=smollm2_full_bytes // 2)
    assert engine.placement.streams
    tokens, stats = greedy(engine, "subspec")
    assert tokens == smollm2_reference
    assert stats.spec.tau > 1.5  # the 4-bit substitute draft is mostly accepted


def test_corrupted_substitute_cache_is_rebuilt(smollm2_dir, smollm2_reference, smollm2_full_bytes):
    budget = smollm2_full_bytes // 2
    engine = engine_for(smollm2_dir, ("subspec",), budget=budget)
    with Checkpoint(smollm2_dir) as ckpt:
        cache_dir = cache_root() / "offload" / f"{fingerprint(ckpt)}-float32"
    # the files of the layers this placement streams (the cache may hold other placements')
    names = {f"layer_{i:05d}.safetensors" for i in engine.placement.streamed_layers}
    cache_files = [
        f for f in cache_dir.glob("substitutes-*/layer_*.safetensors") if f.name in names
    ]
    assert len(cache_files) == len(names)
    del engine
    for f in cache_files:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF  # flip one byte in the middle of the tensors
        f.write_bytes(bytes(data))
    corrupted = {f: f.stat().st_mtime_ns for f in cache_files}
    engine = engine_for(smollm2_dir, ("subspec",), budget=budget)
    kept = [f.name for f, m in corrupted.items() if f.stat().st_mtime_ns == m]
    assert not kept, kept  # rewritten
    assert greedy(engine, "subspec")[0] == smollm2_reference

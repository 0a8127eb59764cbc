"""Each supported family (Llama, Mistral, Qwen2, Qwen3) against transformers' own forward in
fp32, offline on tiny random models: a prefill pass and cached one-token decode steps, with
everything resident and with layers and the LM head streamed from disk."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILIES, make_runtime, minimum_budget, write_tiny
from transformers import AutoModelForCausalLM

from subspec.errors import SubspecError
from subspec.model.forward import SMALL_QUERY, causal_mask

TEXT = (
    "What is the capital of France? The capital of France is Paris. Memory budgets decide "
    "which layers stay in RAM and which stream from disk. The quick brown fox jumps over "
    "the lazy dog. Speculative decoding drafts tokens with a small model."
)
# tokens in the prefill pass (more than forward.SMALL_QUERY: the SDPA path); the rest go one
# at a time through the cache (the small-query path)
PREFILL = 72
DECODE = 8
# what sets each family apart, as subspec must read it from config.json
FEATURES = {
    "llama": dict(tie_word_embeddings=True, qkv_bias=False, qk_norm=False, head_dim=16),
    "mistral": dict(tie_word_embeddings=False, qkv_bias=False, qk_norm=False, head_dim=16),
    "qwen2": dict(tie_word_embeddings=False, qkv_bias=True, qk_norm=False, head_dim=16),
    "qwen3": dict(tie_word_embeddings=True, qkv_bias=False, qk_norm=True, head_dim=32),
}


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """Layer files of the streamed runs go to a cache of this module's own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUBSPEC_HOME", str(tmp_path_factory.mktemp("subspec-home")))
        yield


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, model directory, token ids, transformers' fp32 logits [T, V] over them)."""
    name = request.param
    model_dir = write_tiny(name, tmp_path_factory.mktemp(f"tiny-{name}"), seed=3)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert ref_model.config.model_type == name
    tokenizer_of = make_runtime(model_dir).tokenizer
    ids = tokenizer_of(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) >= PREFILL + DECODE
    tokens = torch.tensor(ids[: PREFILL + DECODE])
    with torch.no_grad():
        ref = ref_model(tokens[None]).logits[0].float()
    return name, model_dir, tokens, ref


def subspec_logits(runtime, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, V]: one prefill pass over the first PREFILL tokens, then one cached
    decode step per token, each at position and slot = the cache's length."""
    assert PREFILL > SMALL_QUERY
    target, cache = runtime.target, runtime.target.cache
    cache.trim(0)
    pos = torch.arange(PREFILL)
    hidden = target.forward(tokens[:PREFILL], pos, pos, causal_mask(0, PREFILL, "cpu"), PREFILL)
    cache.advance(PREFILL)
    out = [target.logits(hidden)]
    for token in tokens[PREFILL:]:
        at = cache.length
        here = torch.tensor([at])
        hidden = target.forward(token[None], here, here, causal_mask(at, 1, "cpu"), at + 1)
        cache.advance(1)
        out.append(target.logits(hidden))
    assert cache.length == tokens.numel()
    return torch.cat(out)


def assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    scale = max(1.0, float(ref.abs().max()))
    for at in range(ref.shape[0]):  # name the first position that is off
        err = float((ours[at] - ref[at]).abs().max())
        step = "prefill" if at < PREFILL else "decode"
        assert err <= 1e-4 * scale, f"position {at} ({step}): max |diff| {err:.2e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_forward_matches_transformers(family):
    name, model_dir, tokens, ref = family
    runtime = make_runtime(model_dir, dtype="float32")
    assert not runtime.placement.streams
    cfg = runtime.model_cfg
    assert cfg.model_type == name
    for feature, want in FEATURES[name].items():
        assert getattr(cfg, feature) == want, feature
    assert_matches(subspec_logits(runtime, tokens), ref)


def test_streamed_forward_identical_to_resident(family):
    """At the minimum budget every layer and the LM head stream from disk: the same logits,
    bit for bit, as the resident run (and so as transformers')."""
    name, model_dir, tokens, ref = family
    resident = subspec_logits(make_runtime(model_dir, dtype="float32"), tokens)
    budget = minimum_budget(model_dir)
    runtime = make_runtime(model_dir, dtype="float32", budget=budget)
    p = runtime.placement
    assert p.resident_layers == [] and p.streamed_layers == list(range(3))
    assert not p.lm_head_resident and not p.embed_resident
    streamed = subspec_logits(runtime, tokens)
    assert torch.equal(streamed, resident)
    assert_matches(streamed, ref)


@pytest.mark.parametrize(("family", "keys", "window"), [
    ("mistral", {"sliding_window": 64}, 64),
    ("qwen2", {"sliding_window": 64, "use_sliding_window": False}, None),
    ("qwen2", {"sliding_window": 64, "use_sliding_window": True}, 64),
])  # fmt: skip
def test_a_sliding_window_holds_the_context(tmp_path, family, keys, window):
    """Attention here reaches every cached token: where the model's window applies, the
    context defaults to it, and a longer one is refused rather than silently diverging."""
    path = write_tiny(family, tmp_path / family)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **keys}))
    runtime = make_runtime(path, context=None)
    assert runtime.model_cfg.sliding_window == window
    assert runtime.cfg.context == (window or min(4096, config["max_position_embeddings"]))
    if window:
        with pytest.raises(SubspecError, match="sliding window of 64"):
            make_runtime(path, context=window + 1)

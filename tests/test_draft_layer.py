"""The draft's native kernels: the fused substitute layer (kernels/draft_layer.py) against the
torch path it replaces, and the tree builder's normaliser against torch."""

import dataclasses

import pytest
import torch
from helpers import make_runtime, minimum_budget, require_kernel, write_tiny

from subspec.kernels import native
from subspec.speculative.decoding import prefill


@pytest.fixture(autouse=True)
def kernel():
    """The int4 kernel: a skip where none can run here, a failure where it should."""
    return require_kernel(native.int4_vnni(), "int4_vnni")


def _draft_step(drafter, start: int):
    """One tree level of 3 nodes after `start` committed tokens, the last one attending to
    the prefix and itself only: logits [3, V] and the keys, values written [L, Hkv, 3, D]."""
    tokens = torch.tensor([5, 17, 42])
    slots = torch.arange(start, start + 3)
    mask = torch.ones(3, start + 3, dtype=torch.bool)
    mask[:2, start + 2] = False
    mask[2, start : start + 2] = False
    logits = drafter.step(tokens, torch.full((3,), start), slots, mask, start + 3)
    cache = drafter.target.cache
    return logits, cache.k[:, :, slots].clone(), cache.v[:, :, slots].clone()


# 6 query heads per kv head, as in Qwen2.5-1.5B: more than the kernel's block of 4 queries
GROUPED = {"num_attention_heads": 12, "num_key_value_heads": 2, "hidden_size": 192}


@pytest.mark.parametrize(
    ("family", "shape"),
    [("llama", None), ("qwen2", None), ("qwen3", None), ("qwen2", GROUPED)],
    ids=["llama", "qwen2", "qwen3", "qwen2-6-per-kv-head"],
)  # plain, qkv bias, q/k norms; and a wider group
def test_fused_draft_layer_matches_torch_path(tmp_path, family, shape):
    path = write_tiny(family, tmp_path / family, shape=shape)
    methods = ("vanilla", "subspec")
    budget = minimum_budget(path, methods, dtype="bfloat16")
    rt = make_runtime(path, methods, budget=budget, dtype="bfloat16")
    drafter = rt.drafters["subspec"]
    layers = drafter.layers.resident
    fused = {i for i, w in layers.items() if w.fused is not None}
    assert fused, "no substitute layer runs fused"
    prompt = rt.encode_prompt("the cat sat on the mat", chat=True)
    prefill(rt.target, prompt, 512)

    got = _draft_step(drafter, len(prompt))
    for i in fused:
        layers[i] = dataclasses.replace(layers[i], fused=None)
    want = _draft_step(drafter, len(prompt))

    for a, b in zip(got, want, strict=True):
        a, b = a.float(), b.float()
        # Both round activations to int8 per 64 values; the fused layer keeps fp32 between its
        # ops where torch rounds to bf16 (per layer it is the closer of the two to an fp32
        # reference over the dequantized weights). A wrong sign or index errs by 50% or more.
        assert ((a - b).abs().max() / b.abs().max()).item() < 0.06
        assert ((a - b).norm() / b.norm()).item() < 0.05
    assert torch.equal(got[0].argmax(-1), want[0].argmax(-1))


def test_fused_draft_layer_does_not_depend_on_the_thread_count(tmp_path):
    """With more threads than rows x kv heads, attention splits each group of query heads
    into blocks: the same arithmetic per query, so the same bits as with two threads."""
    path = write_tiny("qwen2", tmp_path / "m", shape=GROUPED)
    methods = ("vanilla", "subspec")
    rt = make_runtime(path, methods, budget=minimum_budget(path, methods, dtype="bfloat16"),
                      dtype="bfloat16")  # fmt: skip
    drafter = rt.drafters["subspec"]
    prompt = rt.encode_prompt("the cat sat on the mat", chat=True)
    prefill(rt.target, prompt, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _draft_step(drafter, len(prompt))
        torch.set_num_threads(8)  # 3 rows x 2 kv heads < 8: the split path
        eight = _draft_step(drafter, len(prompt))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(two, eight, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_logsumexp_matches_torch(dtype):
    """Rows of a vocabulary-sized length that is no multiple of 16 (the scalar tail), one of
    them holding -inf entries (masked logits) and one all -inf."""
    x = (torch.randn(4, 1003, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    x[1, ::3] = -torch.inf
    x[3] = -torch.inf
    got = native.scaled_logsumexp(x, 5.0)
    want = torch.logsumexp(x.float() * 5.0, -1)
    assert torch.equal(got[3], want[3])  # -inf
    assert torch.allclose(got[:3], want[:3], rtol=1e-6, atol=1e-5)


def test_fused_draft_layer_refuses_slots_outside_the_cache(tmp_path, monkeypatch):
    """A slot past the cache's capacity (or below 0) is refused by the Python wrapper and, with
    that check bypassed, by the kernel itself: an exception, never a write out of bounds."""
    from subspec.kernels import draft_layer

    path = write_tiny("qwen2", tmp_path / "m")
    methods = ("vanilla", "subspec")
    rt = make_runtime(path, methods, budget=minimum_budget(path, methods, dtype="bfloat16"),
                      dtype="bfloat16")  # fmt: skip
    layer, fused = next((i, w.fused) for i, w in rt.drafters["subspec"].layers.resident.items()
                        if w.fused is not None)  # fmt: skip
    cfg, cache = rt.model_cfg, rt.target.cache
    x = torch.randn(1, cfg.hidden_size).bfloat16()
    cos = sin = torch.ones(1, cfg.head_dim, dtype=torch.bfloat16)

    def call(slot: int):
        return fused(cfg, x, cos, sin, cache, layer, torch.tensor([slot]), None, 1)

    assert call(0).shape == x.shape
    for slot in (cache.capacity, -1):
        with pytest.raises(ValueError, match="outside"):
            call(slot)
    with pytest.raises(ValueError, match="do not fit"):
        fused(cfg, x, cos[:, :-1], sin, cache, layer, torch.tensor([0]), None, 1)
    monkeypatch.setattr(draft_layer, "_check", lambda *args: None)
    for slot in (cache.capacity, -1):
        with pytest.raises(RuntimeError, match="failed"):
            call(slot)

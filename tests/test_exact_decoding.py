"""Exact numerics end to end: in bf16 a tree node's logits are the bits sequential decoding
gives, prefill chunking does not change the cache, and every method emits vanilla's tokens,
greedy or sampled with the same seed."""

import re
import threading

import pytest
import torch
from helpers import SetAfter, generate, make_runtime, write_tiny_llama

from subspec.config import SamplingConfig, SpecConfig
from subspec.errors import SubspecError
from subspec.model.forward import causal_mask
from subspec.runtime.generate import stream_generate
from subspec.runtime.runtime import Request
from subspec.speculative.decoding import Cancelled, prefill
from subspec.speculative.tree import build_tree

PROMPTS = ["hello world", "this is a test", "the tiny tokenizer is a test of the world"]
SHAPES = [SpecConfig(depth=5, width=3, draft_temperature=0.5), SpecConfig(depth=8, width=1)]


@pytest.fixture(scope="module")
def exact_vanilla(tiny_model_dir):
    return make_runtime(tiny_model_dir, dtype="bfloat16", numerics="exact")


@pytest.fixture(scope="module")
def tiny_draft_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-draft-exact"), seed=1)


def _sequential_logits(target, start: int, path_tokens: list[int]) -> torch.Tensor:
    """Logits [V] after feeding `path_tokens` one at a time after the first `start` slots."""
    target.cache.trim(start)
    for tok in path_tokens:
        slot = torch.tensor([target.cache.length])
        hidden = target.forward(torch.tensor([tok]), slot, slot, None, target.cache.length + 1)
        target.cache.advance(1)
    return target.logits(hidden)[0]


def test_tree_node_logits_equal_sequential_decoding_bitwise(exact_vanilla):
    target = exact_vanilla.target
    prompt = exact_vanilla.encode_prompt(PROMPTS[2], chat=True)
    target.cache.trim(0)
    first = int(prefill(target, prompt, chunk=512).argmax())
    start = target.cache.length

    def step(tokens, positions, slots, mask, kv_len):  # the target as its own draft
        return target.logits(target.forward(tokens, positions, slots, mask, kv_len))

    tree = build_tree(first, start, depth=4, width=3, temperature=1.0, step=step, device="cpu")
    hidden = target.forward(
        tree.tokens, tree.positions(start), tree.slots(start), tree.mask(start), start + tree.size
    )
    tree_logits = target.logits(hidden)  # [n, V]
    for node in range(tree.size):
        path = tree.ancestors[node].nonzero().flatten()  # the root .. node, by depth
        want = _sequential_logits(target, start, tree.tokens[path].tolist())
        assert torch.equal(tree_logits[node], want), f"node {node} differs"


def test_prefill_chunking_writes_the_same_cache_bits(exact_vanilla):
    target = exact_vanilla.target
    prompt = exact_vanilla.encode_prompt(PROMPTS[2], chat=True)
    caches = []
    for chunk in (512, 5):
        target.cache.trim(0)
        prefill(target, prompt, chunk)
        n = len(prompt)
        caches.append((target.cache.k[:, :, :n].clone(), target.cache.v[:, :, :n].clone()))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_causal_prefill_rows_equal_one_token_steps_bitwise(exact_vanilla):
    target = exact_vanilla.target
    prompt = exact_vanilla.encode_prompt(PROMPTS[0], chat=True)
    t = len(prompt)
    target.cache.trim(0)
    pos = torch.arange(t)
    whole = target.logits(
        target.forward(torch.tensor(prompt), pos, pos, causal_mask(0, t, "cpu"), t)
    )
    assert torch.equal(whole[-1], _sequential_logits(target, 0, prompt))


@pytest.mark.parametrize("spec", SHAPES, ids=["5x3", "8x1"])
@pytest.mark.parametrize("share", [0.7, 0.0])
def test_bf16_subspec_greedy_equals_vanilla(tiny_model_dir, exact_vanilla, spec, share):
    full = exact_vanilla.placement.resident_bytes
    budget = max(int(share * full), _minimum(tiny_model_dir, ("subspec",), spec=spec))
    runtime = make_runtime(tiny_model_dir, ("subspec",), budget, "bfloat16", spec)
    assert runtime.cfg.exact and runtime.placement.streams
    for prompt in PROMPTS:
        assert (
            generate(runtime, "subspec", prompt, 40)[0]
            == generate(exact_vanilla, "vanilla", prompt, 40)[0]
        )


def test_bf16_classic_greedy_equals_vanilla(tiny_model_dir, tiny_draft_dir, exact_vanilla):
    full = exact_vanilla.placement.resident_bytes
    runtime = make_runtime(
        tiny_model_dir, ("classic",), 2 * full, "bfloat16", SHAPES[0], draft=tiny_draft_dir
    )
    for prompt in PROMPTS:
        want = generate(exact_vanilla, "vanilla", prompt, 40)[0]
        assert generate(runtime, "classic", prompt, 40)[0] == want


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sampling_is_seed_exact_across_methods(tiny_model_dir, dtype, shape):
    """The walk draws one sample per emitted token from the target's distribution, in
    vanilla's order: with identical logits, the same seed gives the same tokens, whatever the
    tree's shape and whatever the draft proposed (it reads the draws' noise ahead)."""
    vanilla = make_runtime(tiny_model_dir, dtype=dtype)
    budget = max(
        vanilla.placement.resident_bytes // 2, _minimum(tiny_model_dir, ("subspec",), dtype)
    )
    spec = make_runtime(tiny_model_dir, ("subspec",), budget, dtype, shape)
    for seed in range(12):
        sampling = SamplingConfig(temperature=1.0, top_p=0.95, seed=seed)
        want = generate(vanilla, "vanilla", PROMPTS[1], 16, sampling)[0]
        assert generate(spec, "subspec", PROMPTS[1], 16, sampling)[0] == want, seed


def test_a_sampled_request_drafts_its_own_width_and_stays_seed_exact(tiny_model_dir,
                                                                      exact_vanilla):  # fmt: skip
    """Greedy rounds draft `width`, sampled ones `sampling_width`, in a cache planned for the
    wider; either way the tokens are vanilla's (under the same seed when sampling)."""
    spec = SpecConfig(depth=6, width=1, sampling_width=3, draft_temperature=0.5)
    assert spec.tree_size == 1 + 6 * 3
    budget = _minimum(tiny_model_dir, ("subspec",), spec=spec)
    runtime = make_runtime(tiny_model_dir, ("subspec",), budget, "bfloat16", spec)
    for sampling, width in ((SamplingConfig(), 1), (SamplingConfig(temperature=0.9, seed=5), 3)):
        got, stats = generate(runtime, "subspec", PROMPTS[2], 24, sampling)
        assert set(stats.spec.widths) == {width}
        assert got == generate(exact_vanilla, "vanilla", PROMPTS[2], 24, sampling)[0]


def _minimum(model_dir, methods, dtype="bfloat16", spec=None) -> int:
    with pytest.raises(SubspecError, match="below this model's minimum") as err:
        make_runtime(model_dir, methods, budget=1, dtype=dtype, spec=spec)
    return int(re.search(r"\((\d+) bytes\)", str(err.value)).group(1))


def test_prefill_stops_between_chunks_once_cancelled(tiny_model_dir):
    """A long prompt's prefill (a pass over every weight per chunk) checks its cancel flag
    before each chunk: a request abandoned mid-prefill stops there."""
    runtime = make_runtime(tiny_model_dir)
    target, prompt = runtime.target, list(range(5, 45))  # 40 tokens: 5 chunks of 8
    target.cache.trim(0)
    with pytest.raises(Cancelled):
        prefill(target, prompt, 8, SetAfter(2))
    assert target.cache.length == 16  # two chunks ran, the third was refused
    target.cache.trim(0)
    prefill(target, prompt, 8, SetAfter(99))
    assert target.cache.length == 40
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Cancelled):
        list(stream_generate(runtime, Request(prompt, "vanilla", 4, cancelled=cancelled)))

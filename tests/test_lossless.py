"""Speculative decoding is lossless: greedy output equals vanilla greedy (fp32), bf16
divergences sit at near-ties, and sampling matches vanilla's distribution."""

import time

import pytest
import torch
from helpers import generate as generate_from
from helpers import make_runtime, write_tiny, write_tiny_llama
from helpers import minimum_budget as minimum_budget_of

from subspec.config import SamplingConfig, SpecConfig
from subspec.offload.stores import DiskStore

PROMPTS = ["hello world", "this is a test", "the tiny tokenizer is a test of the world"]
SPEC = SpecConfig(depth=5, width=3, draft_temperature=0.5)
GREEDY = SamplingConfig()


def make_engine(model_dir, methods, budget=None, dtype="float32", spec=SPEC, draft=None):
    return make_runtime(model_dir, methods, budget, dtype, spec, draft)


def generate(runtime, method, prompt, max_new=24, sampling=GREEDY):
    return generate_from(runtime, method, prompt, max_new, sampling)


def minimum_budget(model_dir, methods, dtype="float32") -> int:
    return minimum_budget_of(model_dir, methods, dtype, SPEC)


@pytest.fixture(scope="module")
def tiny_draft_dir(tmp_path_factory):
    """Another random model with the same tokenizer: a poor but valid classic draft."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-draft"), seed=1)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    engine = make_engine(tiny_model_dir, ("vanilla",))
    return [generate(engine, "vanilla", p)[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def full_bytes(tiny_model_dir):
    return make_engine(tiny_model_dir, ("vanilla",)).placement.resident_bytes


def _classic_streams(model_dir, spec) -> int:
    """A budget at which classic with `spec` (its KV cache sized by it) streams some layers:
    a little under the target's and its draft's (here the same model's) full sizes."""
    full = make_engine(model_dir, ("vanilla",), spec=spec).placement.resident_bytes
    return 2 * full - 50_000


@pytest.fixture
def slow_disk(monkeypatch):
    """Layer reads take 10 ms more: verification passes wait, so drafting ahead runs."""
    real = DiskStore.read_into

    def read_into(self, unit, dst, stream=None):
        time.sleep(0.01)
        real(self, unit, dst, stream)

    monkeypatch.setattr(DiskStore, "read_into", read_into)


@pytest.mark.parametrize("share", [None, 0.8, 0.0])
@pytest.mark.parametrize("method", ["vanilla", "subspec"])
def test_greedy_identical_to_resident_vanilla(tiny_model_dir, reference, full_bytes, method, share):
    """Budgets where nothing, some, and nearly everything streams (share 0.0: the minimum)."""
    budget = None if share is None else max(int(share * full_bytes),
                                            minimum_budget(tiny_model_dir, (method,)))  # fmt: skip
    engine = make_engine(tiny_model_dir, (method,), budget)
    if share is not None:
        assert engine.placement.streams and engine.placement.resident_bytes <= budget
    if share == 0.0:  # the minimum: every layer and the LM head stream
        assert engine.placement.resident_layers == []
        assert not engine.placement.lm_head_resident
    for prompt, want in zip(PROMPTS, reference, strict=True):
        tokens, stats = generate(engine, method, prompt)
        assert tokens == want
        if engine.placement.streams:
            assert stats.memory.bytes_streamed > 0


def test_classic_greedy_identical(tiny_model_dir, tiny_draft_dir, reference, full_bytes):
    budget = 2 * full_bytes - 50_000  # the draft model, resident, is inside the budget
    engine = make_engine(tiny_model_dir, ("classic",), budget, draft=tiny_draft_dir)
    assert engine.placement.streams
    for prompt, want in zip(PROMPTS, reference, strict=True):
        assert generate(engine, "classic", prompt)[0] == want


@pytest.mark.parametrize("method", ["subspec", "classic"])
def test_pruned_tree_greedy_identical(
    tiny_model_dir, tiny_draft_dir, reference, full_bytes, method
):
    """Verifying only the best nodes of a wider tree changes nothing in the output (classic's
    own cache is compacted from the slots where the pruned nodes were drafted)."""
    spec = SpecConfig(depth=4, width=3, draft_temperature=0.5, verify_nodes=6)
    if method == "classic":
        budget = 2 * full_bytes - 50_000
    else:
        budget = max(int(0.8 * full_bytes), minimum_budget(tiny_model_dir, (method,)))
    engine = make_engine(tiny_model_dir, (method,), budget, spec=spec, draft=tiny_draft_dir)
    for prompt, want in zip(PROMPTS, reference, strict=True):
        assert generate(engine, method, prompt)[0] == want


def test_the_draft_runs_substitutes_of_the_resident_layers_too(tmp_path):
    """On a CPU the draft reads 4-bit copies of every layer, the resident ones included (a
    draft step costs its reads), and the output stays vanilla's. (Eight layers: with three,
    the staging buffers cost what the layers would, and no budget keeps some of them.)"""
    model_dir = write_tiny("llama", tmp_path, perturb=False, shape={"num_hidden_layers": 8})
    vanilla = make_engine(model_dir, ("vanilla",))
    engine = make_engine(model_dir, ("subspec",), int(0.9 * vanilla.placement.resident_bytes))
    placement = engine.placement
    assert placement.resident_layers and placement.streams and placement.substitutes_everywhere
    draft = engine.drafters["subspec"].layers.resident  # {layer: the draft's LayerWeights}
    target = engine.target.layers.resident
    assert sorted(draft) == list(range(8))
    assert all(draft[i] is not target[i] for i in placement.resident_layers)
    for prompt in PROMPTS:
        assert generate(engine, "subspec", prompt)[0] == generate(vanilla, "vanilla", prompt)[0]


@pytest.mark.parametrize("method", ["subspec", "classic"])
def test_identical_draft_accepts_the_whole_main_path(tiny_model_dir, method):
    """A draft equal to the target (no quantization; or the target as its own classic draft):
    every round accepts depth tokens, so tau = depth + 1 until the token limit. (16-bit
    substitutes cost what the layers cost, so that subspec engine keeps everything resident.)"""
    spec = SpecConfig(depth=4, width=1, bits=16, head_bits=16)
    budget = _classic_streams(tiny_model_dir, spec) if method == "classic" else None
    engine = make_engine(tiny_model_dir, (method,), budget, spec=spec, draft=tiny_model_dir)
    assert engine.placement.streams == (method == "classic")
    tokens, stats = generate(engine, method, PROMPTS[0], max_new=1 + 5 * 4)
    assert stats.spec.accept_lengths == [4] * 4
    assert stats.spec.tau == 5.0


def test_identical_draft_holds_every_sample(tiny_model_dir, reference):
    """Sampling, a draft equal to the target proposes at each node the token that the target's
    next draw will sample (speculative/proposals.py): every round accepts its whole tree, as
    greedy does, and the tokens are vanilla's under the same seed. (Top-k keeps this random
    model's near-flat distribution from putting candidates within the noise's fp16 rounding
    of each other.)"""
    spec = SpecConfig(depth=4, width=1, sampling_width=1, bits=16, head_bits=16)
    engine = make_engine(tiny_model_dir, ("subspec",), spec=spec)
    vanilla = make_engine(tiny_model_dir, ("vanilla",))
    for seed in range(3):
        sampling = SamplingConfig(temperature=1.0, top_p=0.95, top_k=8, seed=seed)
        tokens, stats = generate(engine, "subspec", PROMPTS[0], 1 + 5 * 4, sampling)
        assert stats.spec.accept_lengths == [4] * 4, seed
        assert tokens == generate(vanilla, "vanilla", PROMPTS[0], 1 + 5 * 4, sampling)[0]


def test_a_top_k_below_the_width_stays_seed_exact(tiny_model_dir):
    """Top-k 1 or 2 under a width-3 tree: the draft proposes what top-k leaves (the other
    children are never accepted), and the tokens are vanilla's under the same seed."""
    engine = make_engine(tiny_model_dir, ("subspec",), spec=SpecConfig(depth=4, width=3))
    vanilla = make_engine(tiny_model_dir, ("vanilla",))
    for top_k in (1, 2):
        sampling = SamplingConfig(temperature=0.8, top_k=top_k, seed=1)
        want = generate(vanilla, "vanilla", PROMPTS[1], 12, sampling)[0]
        assert generate(engine, "subspec", PROMPTS[1], 12, sampling)[0] == want


def _bf16_pair(model_dir, numerics: str):
    vanilla = make_runtime(model_dir, ("vanilla",), None, "bfloat16", SPEC, numerics=numerics)
    full_bytes = vanilla.placement.resident_bytes
    budget = max(int(0.6 * full_bytes), minimum_budget(model_dir, ("subspec",), "bfloat16"))
    spec = make_runtime(model_dir, ("subspec",), budget, "bfloat16", SPEC, numerics=numerics)
    assert spec.placement.streams
    return vanilla, spec


def test_bf16_exact_numerics_emit_vanilla_tokens(tiny_model_dir):
    """With exact numerics (the CPU default) a row's result does not depend on the batch it
    is computed in: in bf16 speculation emits vanilla's tokens, with no tolerance at all."""
    vanilla, spec = _bf16_pair(tiny_model_dir, "exact")
    for prompt in PROMPTS:
        assert generate(spec, "subspec", prompt)[0] == generate(vanilla, "vanilla", prompt)[0]


def test_bf16_fast_numerics_diverge_only_at_near_tie(tiny_model_dir):
    """With torch's kernels (fast numerics) batched and one-token passes round differently in
    bf16; a divergence from vanilla may only sit where vanilla's top-2 logits nearly tied."""
    vanilla, spec = _bf16_pair(tiny_model_dir, "fast")
    for prompt in PROMPTS:
        want, vstats = generate(vanilla, "vanilla", prompt)
        got, _ = generate(spec, "subspec", prompt)
        if got != want:
            at = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
            assert vstats.top2_margins[at] < 0.25, (prompt, at, vstats.top2_margins[at])


def _chi2_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample chi-square homogeneity test over categories (rare ones pooled)."""
    total = a + b
    keep = total >= 10
    a = torch.cat([a[keep], a[~keep].sum()[None]]).double()
    b = torch.cat([b[keep], b[~keep].sum()[None]]).double()
    table = torch.stack([a, b])
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2))


def test_sampling_matches_vanilla_distribution(tiny_model_dir, full_bytes, slow_disk):
    """Tokens 2 and 3 (drawn inside speculative rounds) over 300 seeds per method, at
    temperature 1 with top-k 6, against vanilla's, drafting ahead during the reads. p < 1e-3
    fails: a false-failure rate of 0.1% per position, and the seeds are fixed, so the outcome
    is deterministic."""
    sampling = dict(temperature=1.0, top_k=6)
    vanilla = make_engine(tiny_model_dir, ("vanilla",))
    budget = max(int(0.6 * full_bytes), minimum_budget(tiny_model_dir, ("subspec",)))
    spec = make_engine(tiny_model_dir, ("subspec",), budget,
                       spec=SpecConfig(depth=3, width=2, draft_temperature=1.0))  # fmt: skip
    assert spec.placement.streams and spec.cfg.spec.overlap
    vocab = vanilla.model_cfg.vocab_size
    counts = {m: torch.zeros(2, vocab) for m in ("vanilla", "subspec")}
    for method, engine in (("vanilla", vanilla), ("subspec", spec)):
        for seed in range(300):
            s = SamplingConfig(seed=seed + (0 if method == "vanilla" else 10_000), **sampling)
            tokens, _ = generate(engine, method, PROMPTS[0], max_new=3, sampling=s)
            for pos in (0, 1):
                if len(tokens) > pos + 1:
                    counts[method][pos, tokens[pos + 1]] += 1
    for pos in (0, 1):
        p = _chi2_pvalue(counts["vanilla"][pos], counts["subspec"][pos])
        assert p > 1e-3, f"position {pos + 2}: p = {p:.2e}"


@pytest.mark.parametrize("method", ["subspec", "classic"])
def test_overlap_drafts_ahead_and_changes_nothing(
    tiny_model_dir, tiny_draft_dir, reference, full_bytes, slow_disk, method
):
    """The next tree is drafted during the verification pass's waits; the output is vanilla's
    whether or not the guess comes true, with overlap on or off."""
    if method == "classic":
        budget = 2 * full_bytes - 50_000
    else:
        budget = max(int(0.5 * full_bytes), minimum_budget(tiny_model_dir, (method,)))
    for overlap in (True, False):
        spec = SpecConfig(depth=5, width=3, draft_temperature=0.5, overlap=overlap)
        engine = make_engine(tiny_model_dir, (method,), budget, spec=spec, draft=tiny_draft_dir)
        for prompt, want in zip(PROMPTS, reference, strict=True):
            tokens, stats = generate(engine, method, prompt)
            assert tokens == want
            assert (stats.spec.overlap_s > 0) == overlap


def test_identical_draft_drafted_ahead_is_used(tiny_model_dir, slow_disk):
    """With the target as its own draft every guess comes true: every round after the first
    starts from a tree drafted during the previous pass."""
    spec = SpecConfig(depth=4, width=1, bits=16, head_bits=16)
    budget = _classic_streams(tiny_model_dir, spec)
    engine = make_engine(tiny_model_dir, ("classic",), budget, spec=spec, draft=tiny_model_dir)
    tokens, stats = generate(engine, "classic", PROMPTS[0], max_new=1 + 5 * 4)
    assert stats.spec.accept_lengths == [4] * 4
    assert stats.spec.lookahead_hits == 3


def test_qwen2_greedy_identical(tiny_qwen2_model_dir):
    """Qwen2 (qkv bias, untied LM head): subspec, with layers streaming, gives vanilla's
    greedy tokens."""
    vanilla = make_engine(tiny_qwen2_model_dir, ("vanilla",))
    full_bytes = vanilla.placement.resident_bytes
    budget = max(int(0.6 * full_bytes), minimum_budget(tiny_qwen2_model_dir, ("subspec",)))
    engine = make_engine(tiny_qwen2_model_dir, ("subspec",), budget)
    assert engine.placement.streams
    for prompt in PROMPTS:
        assert generate(engine, "subspec", prompt)[0] == generate(vanilla, "vanilla", prompt)[0]

"""Unit tests on tiny tensors: KV compaction, tree masks and positions, the verifier's walk,
sampling filters, the planner, size parsing, and the widened bf16 matmul and attention."""

import dataclasses

import pytest
import torch

from subspec import sizes
from subspec.config import SamplingConfig, SpecConfig, parse_size
from subspec.errors import SubspecError
from subspec.model import layers
from subspec.model.forward import attention
from subspec.model.kv_cache import KVCache
from subspec.offload.planner import ModelSizes, plan
from subspec.speculative.sampling import apply_top_k, apply_top_p, target_probs
from subspec.speculative.tree import Tree, build_tree
from subspec.speculative.verify import walk


def test_kv_accept_moves_accepted_slots_in_every_layer():
    cache = KVCache(2, 1, 2, 10, torch.float32, "cpu")
    cache.k[:, 0, :, 0] = torch.arange(10.0)
    cache.v[:, 0, :, 1] = -torch.arange(10.0)
    cache.advance(3)
    cache.accept(torch.tensor([5, 7, 9]))
    assert cache.length == 6
    assert cache.k[1, 0, :6, 0].tolist() == [0, 1, 2, 5, 7, 9]
    assert cache.v[0, 0, :6, 1].tolist() == [0, -1, -2, -5, -7, -9]


def test_kv_accept_overlapping_ranges():
    cache = KVCache(1, 1, 1, 8, torch.float32, "cpu")
    cache.k[0, 0, :, 0] = torch.arange(8.0)
    cache.advance(2)
    cache.accept(torch.tensor([3, 4, 5]))  # destination overlaps the sources
    assert cache.k[0, 0, :5, 0].tolist() == [0, 1, 3, 4, 5]


def test_kv_length_is_bounded_and_trim_forgets():
    cache = KVCache(1, 1, 1, 8, torch.float32, "cpu")
    cache.advance(5)
    with pytest.raises(ValueError):
        cache.advance(4)  # past the capacity
    cache.trim(3)
    assert cache.length == 3
    cache.trim(7)  # trimming never grows it
    assert cache.length == 3
    cache.trim(0)
    assert cache.length == 0


def _chain_step(vocab: int, favourite):
    """A fake draft: next token = favourite(prev) with high probability, then prev+1."""

    def step(tokens, positions, slots, mask, kv_len):
        logits = torch.full((tokens.numel(), vocab), -10.0)
        for r, t in enumerate(tokens.tolist()):
            logits[r, favourite(t) % vocab] = 5.0
            logits[r, (t + 1) % vocab] = 3.0
        return logits

    return step


def test_build_tree_shapes_masks_and_positions():
    tree = build_tree(2, 10, depth=3, width=2, temperature=1.0,
                      step=_chain_step(8, lambda t: t * 2), device="cpu")  # fmt: skip
    assert tree.size == 7
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert tree.positions(10).tolist() == [10, 11, 11, 12, 12, 13, 13]
    assert tree.slots(10).tolist() == list(range(10, 17))
    # best path: 2 -> 4 -> 8%8=0 -> 0; second branch at depth 1 is 3
    assert tree.tokens[:3].tolist() == [2, 4, 3]
    mask = tree.mask(10)
    assert mask.shape == (7, 17) and mask[:, :10].all()
    for i in range(7):  # each node sees exactly its ancestors and itself
        chain, j = set(), i
        while j >= 0:
            chain.add(j)
            j = int(tree.parents[j])
        assert set(torch.nonzero(mask[i, 10:]).flatten().tolist()) == chain


def test_build_tree_passes_ancestor_masks_to_the_draft():
    seen = []

    def step(tokens, positions, slots, mask, kv_len):
        seen.append((tokens.clone(), positions.clone(), slots.clone(), mask.clone(), kv_len))
        return torch.randn(tokens.numel(), 16)

    build_tree(1, 4, depth=3, width=3, temperature=0.5, step=step, device="cpu")
    assert [s[4] for s in seen] == [5, 8, 11]
    assert seen[1][1].tolist() == [5, 5, 5] and seen[1][2].tolist() == [5, 6, 7]
    assert seen[1][3].shape == (3, 8) and seen[1][3][:, 4].all()  # all see the root


def _tree(tokens, parents):
    n = len(tokens)
    anc = torch.zeros(n, n, dtype=torch.bool)
    depths = [0] * n
    for i, p in enumerate(parents):
        anc[i, i] = True
        if p >= 0:
            anc[i] |= anc[p]
            depths[i] = depths[p] + 1
    n_scores = -torch.tensor(depths, dtype=torch.float32)
    return Tree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths), anc,
                n_scores, torch.arange(n))  # fmt: skip


def test_prune_keeps_best_nodes_with_their_ancestors_renumbered():
    tree = build_tree(2, 10, depth=3, width=2, temperature=1.0,
                      step=_chain_step(8, lambda t: t * 2), device="cpu")  # fmt: skip
    pruned = tree.prune(4)
    assert pruned.size >= 4 and pruned.origin[0] == 0
    kept = pruned.origin.tolist()
    assert sorted(kept) == kept  # parent-first order preserved
    best = set(torch.topk(tree.scores, 4).indices.tolist())
    assert best <= set(kept)
    for i, orig in enumerate(kept):  # same tokens, parents mapped to the new numbering
        assert pruned.tokens[i] == tree.tokens[orig]
        p = int(pruned.parents[i])
        assert (p == -1) == (orig == 0)
        if p >= 0:
            assert kept[p] == int(tree.parents[orig])
    assert torch.equal(pruned.ancestors, tree.ancestors[pruned.origin][:, pruned.origin])
    assert tree.prune(100) is tree


def _onehot(rows, vocab=6):
    logits = torch.zeros(len(rows), vocab)
    for i, t in enumerate(rows):
        logits[i, t] = 10.0
    return logits


# root(0) -> 1 (node 1), 2 (node 2); node 1 -> 3 (node 3); node 2 -> 3 (node 4), 4 (node 5);
# node 5 -> 1 (node 6). Tokens repeat across branches, so only the node says which is meant.
WALK_TREE = ([0, 1, 2, 3, 3, 4, 1], [-1, 0, 0, 1, 2, 2, 5])
# the target's choice at each node: a different token at every node
CHOICES = [2, 3, 4, 5, 0, 1, 5]


def test_walk_greedy_follows_each_nodes_own_logits():
    tree = _tree(*WALK_TREE)
    greedy = SamplingConfig()
    logits = _onehot(CHOICES)
    want = ([2, 5, 6], 5)  # 0 -(2)-> node 2 -(4)-> node 5 -(1)-> node 6, which says 5
    assert _walk(tree, logits, greedy, None) == want
    # a walk that read another node's row would go elsewhere: rows by depth, by parent, by
    # the node's token, by the previous or next index, or always the root's
    n = tree.size
    wrong_rows = {
        "depth": tree.depths,
        "parent": tree.parents.clamp(min=0),
        "token": tree.tokens,
        "previous": (torch.arange(n) - 1).clamp(min=0),
        "next": (torch.arange(n) + 1) % n,
        "root": torch.zeros(n, dtype=torch.long),
    }
    for name, rows in wrong_rows.items():
        assert _walk(tree, logits[rows], greedy, None) != want, name
    # stopping early: the bonus is the choice of the node where the walk stops
    stop_at_node_2 = list(CHOICES)
    stop_at_node_2[2] = 0
    assert _walk(tree, _onehot(stop_at_node_2), greedy, None) == ([2], 0)
    stop_at_node_3 = [1, 3, 4, 2, 0, 1, 5]
    assert _walk(tree, _onehot(stop_at_node_3), greedy, None) == ([1, 3], 2)
    assert _walk(tree, _onehot([5, 3, 4, 5, 0, 1, 5]), greedy, None) == ([], 5)


def test_walk_sampling_is_the_target_distribution():
    """Each emitted token follows the distribution of the node it is drawn at: the first the
    root's, the second node 1's or node 2's, depending on the first."""
    tree = _tree([0, 1, 2], [-1, 0, 0])
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]])
    cfg = SamplingConfig(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    first = torch.zeros(4)
    second = torch.zeros(3, 4)  # by the node drawn at
    for _ in range(6000):
        path, bonus = _walk(tree, probs.log(), cfg, gen)
        assert len(path) <= 1
        first[tree.tokens[path[0]] if path else bonus] += 1
        if path:
            second[path[0], bonus] += 1
    assert torch.allclose(first / first.sum(), probs[0], atol=0.03)
    for node in (1, 2):
        got = second[node] / second[node].sum()
        assert torch.allclose(got, probs[node], atol=0.05), (node, got)


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[True, False, False, True]]
    # probabilities 0.09, 0.66, 0.24, 0.03: top-p keeps the fewest tokens reaching p

    def kept(p):
        return (~torch.isinf(apply_top_p(logits, p))).tolist()

    assert kept(0.6) == [[False, True, False, False]]
    assert kept(0.7) == [[False, True, True, False]]  # 0.66 alone falls short
    assert kept(0.95) == [[True, True, True, False]]
    assert kept(1.0) == [[True, True, True, True]]
    p = target_probs(logits, SamplingConfig(temperature=0.5, top_k=3))
    assert p[0, 3] == 0 and abs(float(p.sum()) - 1) < 1e-6


@pytest.mark.parametrize(
    "kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)]
)
def test_invalid_sampling_values(kw):
    with pytest.raises(SubspecError):
        SamplingConfig(**kw)


def test_invalid_spec_values():
    for kw in (dict(depth=0), dict(width=0), dict(draft_temperature=0), dict(bits=5)):
        with pytest.raises(SubspecError):
            SpecConfig(**kw)


def test_parse_size():
    assert parse_size("1.2GB") == 1_200_000_000
    assert parse_size("900MiB") == 900 * 2**20
    assert parse_size("4096") == 4096
    for bad in ("", "1.2XB", "GB", "-1GB", "1,2GB"):
        with pytest.raises(SubspecError):
            parse_size(bad)


SIZES = ModelSizes(num_layers=10, layer_bytes=100, substitute_bytes=30, embed_bytes=200,
                   lm_head_bytes=200, norm_bytes=1, kv_bytes=50)  # fmt: skip


def test_plan_with_substitutes_everywhere_counts_one_per_layer():
    """A draft of substitutes for every layer: each resident layer costs its substitute too,
    and nothing is substituted when nothing streams."""
    from dataclasses import replace

    everywhere = replace(SIZES, substitutes_everywhere=True)
    p = plan(everywhere, 900)
    assert p.streams and p.substitutes_everywhere and p.resident_bytes <= 900
    assert p.breakdown["substitutes"] == 10 * 30
    assert len(p.resident_layers) < len(plan(SIZES, 900).resident_layers)
    assert plan(everywhere, None).breakdown["substitutes"] == 0


def test_plan_everything_resident_without_budget():
    p = plan(SIZES, None)
    assert p.resident_layers == list(range(10)) and not p.streams
    assert p.resident_bytes == 10 * 100 + 200 + 200 + 1 + 50


def test_plan_streams_what_does_not_fit_and_respects_budget():
    p = plan(SIZES, 900)
    assert p.streams and not p.embed_resident
    assert p.resident_bytes <= 900
    # one more resident layer would break the budget
    assert p.resident_bytes + 100 - 30 > 900
    assert p.resident_layers + p.streamed_layers == list(range(10))
    assert p.breakdown["staging_buffers"] == 200


def test_plan_streams_the_lm_head_only_when_no_layer_fits_beside_it():
    with_head = 10 * 30 + 2 * 100 + 200 + 1 + 50  # no layer resident, the LM head resident
    p = plan(SIZES, with_head)
    assert p.resident_layers == [] and p.lm_head_resident
    p = plan(SIZES, with_head - 1)  # the head's 200 bytes hold 2 layers (70 more each)
    assert p.resident_layers == [0, 1] and not p.lm_head_resident and not p.embed_resident
    assert p.breakdown["lm_head"] == 0 and p.resident_bytes == with_head - 200 + 2 * 70
    assert "+ the LM head streamed" in p.summary()


def test_plan_keeps_a_shared_lm_head_resident():
    """A draft that shares the target's head needs it resident: the minimum includes it."""
    shared = dataclasses.replace(SIZES, head_can_stream=False)
    with_head = 10 * 30 + 2 * 100 + 200 + 1 + 50
    assert plan(shared, with_head).lm_head_resident
    with pytest.raises(SubspecError, match=str(with_head)):
        plan(shared, with_head - 1)


def test_plan_refuses_budget_below_minimum_and_names_it():
    minimum = 10 * 30 + 2 * 100 + 1 + 50  # the LM head streams through the layer buffers
    assert not plan(SIZES, minimum).lm_head_resident
    with pytest.raises(SubspecError, match=str(minimum)):
        plan(SIZES, minimum - 1)


@pytest.mark.parametrize("scratch", [1 << 23, 5 * 64 + 7])  # one chunk; many, the last ragged
def test_widened_linear_is_fp32_math_rounded_once(monkeypatch, scratch):
    monkeypatch.setattr(sizes, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(layers, "WIDEN_SCRATCH_ELEMENTS", scratch)
    monkeypatch.setattr(layers._scratch, "buffer", None, raising=False)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 64, generator=g).bfloat16()  # [out, in]
    b = torch.randn(100, generator=g).bfloat16()
    x = torch.randn(layers.WIDEN_MIN_ROWS, 64, generator=g).bfloat16()  # enough rows to widen
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    got = layers.dense(w, b)(x)
    assert got.dtype == torch.bfloat16 and got.shape == (x.shape[0], 100)
    # fp32 sums in another order can land one bf16 rounding step away, never more
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-5)
    assert layers._scratch.buffer.numel() == min(scratch, w.numel())  # the widened path ran
    few = layers.dense(w, b)(x[:2])  # below WIDEN_MIN_ROWS: plain bf16 F.linear
    assert torch.equal(few, torch.nn.functional.linear(x[:2], w, b))


def test_native_bf16_cpus_do_not_widen(monkeypatch):
    monkeypatch.setattr(sizes, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(layers._scratch, "buffer", None, raising=False)
    w = torch.randn(100, 64).bfloat16()  # [out, in]
    x = torch.randn(layers.WIDEN_MIN_ROWS, 64).bfloat16()
    assert torch.equal(layers.dense(w)(x), torch.nn.functional.linear(x, w))
    assert layers._scratch.buffer is None
    assert sizes.widen_scratch_bytes(torch.bfloat16, torch.device("cpu"), w.numel()) == 0


def test_small_query_attention_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 5, 8, generator=g).bfloat16()  # [Hq, T, D]
    k, v = torch.randn(2, 2, 9, 8, generator=g).bfloat16()  # [Hkv, S, D] each
    mask = torch.rand(5, 9, generator=g) > 0.3
    mask[:, 0] = True  # every query attends somewhere
    want = torch.nn.functional.scaled_dot_product_attention(
        q[None].float(), k[None].float(), v[None].float(), attn_mask=mask, enable_gqa=True
    )[0]
    got = attention(q, k, v, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-2)


def _walk(tree, logits, cfg, gen) -> tuple[list[int], int]:
    """(accepted nodes, bonus token) of a walk."""
    verdict = walk(tree, logits, cfg, gen)
    return verdict.nodes.tolist(), verdict.bonus


def test_the_wheel_carries_every_kernel_source():
    """package-data names every file the kernels compile from (a header left out builds
    nowhere but in an editable install)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["subspec"]
    package = root / "src" / "subspec"
    for source in (package / "kernels" / "csrc").iterdir():
        relative = str(source.relative_to(package))
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative

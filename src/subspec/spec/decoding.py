"""Decoding loops. Each yields lists of newly committed token ids; generate.py adds the
stopping rules, text and statistics that every method shares.

Convention: the KV cache holds every committed token except the last one (`pending`), which
is the next input: the vanilla step's token, or the root of a speculative tree.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from subspec.config import SamplingConfig, SpecConfig
from subspec.model.forward import causal_mask
from subspec.model.placed import PlacedModel
from subspec.spec.sampling import choose
from subspec.spec.tree import build_tree
from subspec.spec.verify import walk


@dataclass
class DecodeStats:
    """Counters a decoding loop fills in as it goes."""

    target_forwards: int = 0  # decode phase only
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    accept_lengths: list[int] = field(default_factory=list)  # accepted draft tokens per round
    margins: list[float] = field(default_factory=list)  # vanilla greedy: top-2 logit gap per token


def _clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done: CUDA runs asynchronously,
    so an unsynchronised timer would measure only the queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def prefill(target: PlacedModel, prompt: list[int], chunk: int) -> torch.Tensor:
    """Run the prompt through an empty cache in chunks; returns the last position's logits [V]."""
    cache = target.cache
    for start in range(0, len(prompt), chunk):
        ids = torch.tensor(prompt[start : start + chunk], dtype=torch.long, device=target.device)
        t = ids.numel()
        pos = torch.arange(start, start + t, device=target.device)
        hidden = target.forward(ids, pos, pos, causal_mask(start, t, target.device), start + t)
        cache.advance(t)
    return target.logits(hidden[-1:])[0]


def vanilla(
    target: PlacedModel,
    prompt: list[int],
    sampling: SamplingConfig,
    gen,
    stats: DecodeStats,
    chunk: int,
) -> Iterator[list[int]]:
    """Plain autoregressive decoding: one target pass per token."""
    t0 = time.perf_counter()
    logits = prefill(target, prompt, chunk)
    stats.prefill_s = time.perf_counter() - t0
    cache, device = target.cache, target.device
    while True:
        if sampling.greedy:
            top2 = logits.topk(2).values
            stats.margins.append(float(top2[0] - top2[1]))
        pending = choose(logits, sampling, gen)
        yield [pending]
        slot = torch.tensor([cache.length], device=device)
        tok = torch.tensor([pending], device=device)
        hidden = target.forward(tok, slot, slot, None, cache.length + 1)
        stats.target_forwards += 1
        cache.advance(1)
        logits = target.logits(hidden)[0]


def speculative(
    target: PlacedModel, drafter, prompt: list[int], sampling: SamplingConfig, spec: SpecConfig,
    gen, stats: DecodeStats, chunk: int,
) -> Iterator[list[int]]:  # fmt: skip
    """Draft a tree, verify it in one target pass, emit the accepted path and the bonus token."""
    t0 = time.perf_counter()
    pending = choose(prefill(target, prompt, chunk), sampling, gen)
    drafter.prefill(prompt, chunk)
    stats.prefill_s = time.perf_counter() - t0
    cache, device = target.cache, target.device
    yield [pending]
    while True:
        start = cache.length
        t0 = _clock(device)
        tree = build_tree(
            pending, start, spec.depth, spec.width, spec.draft_temperature, drafter.step, device
        )
        tree = tree.prune(spec.verify_nodes) if spec.verify_nodes else tree
        t1 = _clock(device)
        hidden = target.forward(
            tree.tokens, tree.positions(start), tree.slots(start), tree.mask(start),
            start + tree.size,
        )  # fmt: skip
        verdict = walk(tree, target.logits(hidden), sampling, gen)
        stats.draft_s += t1 - t0
        stats.verify_s += _clock(device) - t1
        stats.target_forwards += 1
        stats.accept_lengths.append(verdict.accepted)
        nodes = verdict.nodes  # [a] on device
        cache.advance(1)  # the root, verified at slot `start`
        cache.accept(nodes + start)
        drafter.commit(tree.origin[torch.cat([nodes.new_zeros(1), nodes])] + start)
        pending = verdict.bonus
        yield verdict.tokens

"""Decoding loops. Each yields a Batch per target pass: the newly committed token ids and the
target's logits they were chosen from; generate.py adds the stopping rules, text, log
probabilities and statistics that every method shares.

Convention: the KV cache holds every committed token except the last one (`pending`), which
is the next input: the vanilla step's token, or the root of a speculative tree. A request may
start on a cache that already holds a prefix of its prompt (runtime.py, prefix reuse): prefill
computes only the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from subspec.config import SamplingConfig, SpecConfig
from subspec.model.forward import causal_mask
from subspec.model.layers import Waits
from subspec.model.placed import PlacedModel
from subspec.speculative.lookahead import Lookahead
from subspec.speculative.proposals import Coupled, Dice, Proposal, Ranked
from subspec.speculative.sampling import choose
from subspec.speculative.shape import ShapeChooser, accepted_by_width
from subspec.speculative.slots import RoundSlots
from subspec.speculative.tree import Tree, TreeBuilder
from subspec.speculative.verify import walk


@dataclass
class DecodeStats:
    """Counters a decoding loop fills in as it goes."""

    target_forwards: int = 0  # decode phase only
    prefill_s: float = 0.0
    draft_s: float = 0.0  # drafting that held up a round (not hidden behind transfers)
    verify_s: float = 0.0  # the verification pass, without the drafting done in its waits
    overlap_s: float = 0.0  # drafting done while the verification pass waited for weights
    draft_steps: int = 0  # draft levels run in the open (not drafted ahead)
    lookahead_steps: int = 0  # draft calls run ahead, inside the verification pass
    lookahead_hits: int = 0  # rounds whose tree was drafted ahead
    accept_lengths: list[int] = field(default_factory=list)  # accepted draft tokens per round
    # each round's (draft, verify, overlap) seconds, as add_round's arguments
    rounds: list[tuple[float, float, float]] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # tree depth of each round
    widths: list[int] = field(default_factory=list)  # tree width of each round
    margins: list[float] = field(default_factory=list)  # vanilla greedy: top-2 logit gap per token

    def add_round(self, draft_s: float, verify_s: float, overlap_s: float, accepted: int,
                  depth: int, width: int) -> None:  # fmt: skip
        self.depths.append(depth)
        self.widths.append(width)
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.overlap_s += overlap_s
        self.target_forwards += 1
        self.accept_lengths.append(accepted)
        self.rounds.append((draft_s, verify_s, overlap_s))


def _clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done: CUDA runs asynchronously,
    so an unsynchronised timer would measure only the queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass(frozen=True)
class Batch:
    """Tokens committed by one target pass, with the logits the target chose each of them from."""

    tokens: list[int]
    logits: torch.Tensor  # [n, V] the pass's logits (n >= 1)
    # [len(tokens) - 1] a tree's accepted nodes: the first token comes from the root's row, each
    # next one from its predecessor's node; None: token i from row i
    path: torch.Tensor | None = None

    def token_logits(self) -> torch.Tensor:
        """[len(tokens), V]: the target's logits that each token was chosen from."""
        if self.path is None:
            return self.logits
        return self.logits[torch.cat([self.path.new_zeros(1), self.path])]


class Cancelled(Exception):
    """The request was cancelled while its prompt was being prefilled."""


def prefill(target: PlacedModel, prompt: list[int], chunk: int, cancelled=None) -> torch.Tensor:
    """Run the prompt, after the part the cache already holds (fewer slots than the prompt's
    tokens), through the target in chunks; returns the last position's logits [V].
    `cancelled` (a threading.Event or None) is checked before each chunk: a long prompt's
    prefill (a pass over every weight per chunk) stops there, raising Cancelled."""
    cache = target.cache
    if not cache.length < len(prompt):
        raise ValueError(f"the cache holds {cache.length} slots of a {len(prompt)}-token prompt")
    for start in range(cache.length, len(prompt), chunk):
        if cancelled is not None and cancelled.is_set():
            raise Cancelled
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
    cancelled=None,
) -> Iterator[Batch]:
    """Plain autoregressive decoding: one target pass per token (`cancelled`: see prefill)."""
    t0 = time.perf_counter()
    logits = prefill(target, prompt, chunk, cancelled)
    stats.prefill_s = time.perf_counter() - t0
    cache, device = target.cache, target.device
    while True:
        if sampling.greedy:
            top2 = logits.topk(2).values
            stats.margins.append(float(top2[0] - top2[1]))
        pending = choose(logits, sampling, gen)
        yield Batch([pending], logits[None])
        slot = torch.tensor([cache.length], device=device)
        tok = torch.tensor([pending], device=device)
        hidden = target.forward(tok, slot, slot, None, cache.length + 1)
        stats.target_forwards += 1
        cache.advance(1)
        logits = target.logits(hidden)[0]


def speculative(
    target: PlacedModel, drafter, prompt: list[int], sampling: SamplingConfig, spec: SpecConfig,
    gen, stats: DecodeStats, chunk: int, cancelled=None,
) -> Iterator[Batch]:  # fmt: skip
    """Draft a tree, verify it in one target pass, emit the accepted path and the bonus token.

    With spec.overlap and streamed target layers, the next tree is drafted during the pass's
    waits for weights (lookahead.py) and used when its guess comes true. `cancelled`: see
    prefill."""
    spec = spec.for_request(sampling)  # a sampled request's trees are wider
    t0 = time.perf_counter()
    logits = prefill(target, prompt, chunk, cancelled)
    pending = choose(logits, sampling, gen)
    drafter.prefill(prompt, chunk)
    stats.prefill_s = time.perf_counter() - t0
    cache, device = target.cache, target.device
    yield Batch([pending], logits[None])
    builder = None  # the next tree, when drafted ahead
    chooser = ShapeChooser(spec)
    dice = None if sampling.greedy else Dice(gen, logits.shape[-1], device, spec.draws_ahead)
    while True:
        start = cache.length
        slots = RoundSlots(start, spec.cache_slots, cache.capacity)
        t0 = _clock(device)
        propose = _proposal(spec, sampling, dice)
        if builder is None:
            shape = chooser.shape()
            builder = TreeBuilder(pending, shape.depth, shape.width, propose, drafter.step,
                                  device, base=start)  # fmt: skip
        else:
            stats.lookahead_hits += 1
        slots.take(builder.size)  # the tree's, from `start`
        open_steps = builder.depth - builder.level
        while not builder.done:
            builder.step()
        drafted = builder.tree()
        tree = _verified(drafted, spec.verify_nodes, drafter, start)
        t1 = _clock(device)
        ahead = None
        if spec.overlap and target.layers.streams:
            ahead = Lookahead(tree, slots, spec, chooser.shape(), propose, drafter, device)
        waits = Waits(_in_waits(dice, ahead))
        hidden = target.forward(
            tree.tokens, tree.positions(start), tree.slots(start), tree.mask(start),
            start + tree.size, waits,
        )  # fmt: skip
        logits = target.logits(hidden, waits=waits)
        verdict = walk(tree, logits, sampling, gen)
        if dice is not None:
            dice.advance(len(verdict.tokens))
        t2 = _clock(device)
        overlap_s, ahead_steps = (ahead.work_s, ahead.steps) if ahead else (0.0, 0)
        draft_s, verify_s = t1 - t0, t2 - t1 - overlap_s
        stats.add_round(draft_s, verify_s, overlap_s, verdict.accepted, builder.depth,
                        builder.width)  # fmt: skip
        stats.draft_steps += open_steps
        stats.lookahead_steps += ahead_steps
        nodes = verdict.nodes  # [a] on device, in the verified tree
        chooser.observe_steps(builder.width, draft_s, open_steps)
        if ahead:
            chooser.observe_steps(ahead.rows, ahead.level_s, ahead_steps)
        free_s = waits.waited_s + overlap_s  # the pass's time not spent on the target's compute
        drafted_path = tree.origin[nodes]  # the accepted nodes' indices as drafted
        chooser.observe_round(builder.depth, accepted_by_width(drafted_path, builder.width),
                              tree.size, verify_s + overlap_s, free_s)  # fmt: skip
        cache.advance(1)  # the root, verified at slot `start`
        cache.accept(nodes + start)
        drafter.commit(torch.cat([nodes.new_zeros(1), nodes]) + start)
        whole = verdict.accepted == tree.depth  # the tree accepted to its last level
        builder = ahead.take(nodes.tolist(), verdict.bonus) if ahead else None
        if ahead:
            chooser.observe_lookahead(whole, builder is not None, free_s, ahead.rows)
        pending = verdict.bonus
        yield Batch(verdict.tokens, logits, nodes)


def _in_waits(dice: Dice | None, ahead: Lookahead | None):
    """The work of a pass's waits for weights: reading the dice ahead (each row is drawn
    once and read as the draws come), then drafting ahead."""

    def work(expected_wait_s: float) -> bool:
        if dice is not None and dice.read_ahead():
            return True
        return ahead is not None and ahead.work(expected_wait_s)

    return work if dice is not None or ahead is not None else None


def _proposal(spec: SpecConfig, sampling: SamplingConfig, dice: Dice | None) -> Proposal:
    """What a round's tree proposes: the draft's best tokens greedy, else the tokens the
    target's next draws will sample where the draft agrees with it (proposals.py)."""
    if dice is None:
        return Ranked(spec.draft_temperature)
    return Coupled(dice, sampling, spec.draft_temperature, dice.first)


def _verified(drafted: Tree, keep: int, drafter, start: int) -> Tree:
    """The tree to verify: the drafted one, or its `keep` best nodes (0: all), whose draft KV
    then moves to the slots they are verified at (start + their index), where the lookahead
    and the drafter's commit find it."""
    tree = drafted.prune(keep) if keep else drafted
    if tree is not drafted:
        drafter.relocate(start + tree.origin, start)
    return tree

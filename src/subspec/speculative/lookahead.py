"""Drafting the next round's tree while the target's verification pass waits for weights.

A guess is one outcome of the walk: the target accepts a full-depth path of the current tree
whole, then picks the draft's own top token after its leaf as the bonus. The next tree is
grown from each of the `spec.guesses` best guesses (the best-scoring full-depth paths) in
the cache slots after the current tree, in the gaps of the verification pass, all of them in
one batched draft step per level (a step costs about its weight reads, whatever its rows).
After the walk the tree of the guess that came true is kept, if any (so this changes what is
proposed, never what is emitted).

The drafting runs a part per call of `work()`: one decoder layer of a draft step (see
Drafter.step_parts), so a wait is filled up to its end and delays the pass by at most a
part, and a level runs on across waits. A part starts only in a wait expected to last at
least MIN_FILL of a part. A level still unfinished when the pass ends is dropped. Once the
trees have their chosen depth, waits that would otherwise idle deepen them, level by level,
as far as the KV cache allows (only where the depth is chosen per round: a fixed depth stays
fixed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator

import torch

from subspec.config import SpecConfig
from subspec.speculative.proposals import Proposal
from subspec.speculative.shape import Shape
from subspec.speculative.slots import RoundSlots
from subspec.speculative.tree import Tree, TreeBuilder, grow_together

MIN_FILL = 0.5  # the share of a part a wait must be expected to fill to start one


class Lookahead:
    """The next round's tree, drafted ahead of the walk on guesses about its outcome."""

    def __init__(self, tree: Tree, slots: RoundSlots, spec: SpecConfig, shape: Shape,
                 propose: Proposal, drafter, device):  # fmt: skip
        """`tree`: the one being verified, node j's draft KV at slot `slots.start + j`;
        `slots`: the round's, the tree's already taken; `shape`: the next tree's; `propose`:
        the tree's proposal (its guesses' and next trees' follow it); `drafter`: its step and
        step_parts draft the levels."""
        self.tree, self.start, self.slots, self.propose = tree, slots.start, slots, propose
        self.spec, self.shape, self.drafter, self.device = spec, shape, drafter, device
        last = tree.depths == tree.depth
        scores = torch.where(last, tree.scores, torch.full_like(tree.scores, -torch.inf))
        n, self.room = self._guesses_and_room(int(last.sum()))
        self.leaves = scores.topk(n).indices  # [n] the ends of the best full-depth paths
        self.paths = [tree.ancestors[leaf].nonzero().flatten() for leaf in self.leaves]
        self.builders: list[TreeBuilder] = []  # one per guess, once the leaves are re-fed
        self.guesses: list[int] = []  # the bonus token guessed after each leaf
        self._level: Generator | None = None  # the level being drafted, part by part
        self.work_s, self.parts = 0.0, 0  # every part run
        self.level_s, self.steps = 0.0, 0  # the levels completed (the guesses' step included)
        self._level_s = 0.0  # seconds so far of the level being drafted

    def work(self, expected_wait_s: float = math.inf) -> bool:
        """Draft one part of the next trees (the first level guesses their roots) if the wait
        is expected to last MIN_FILL of a part; False when it drafted nothing (also once the
        trees are complete and as deep as they may grow)."""
        if self._level is None and self.builders and not any(b.can_grow for b in self.builders):
            return False
        if self.parts and expected_wait_s < MIN_FILL * self.work_s / self.parts:
            return False
        t0 = time.perf_counter()
        if self._level is None:
            self._level = self._start() if not self.builders else self._grow()
        try:
            next(self._level)
        except StopIteration:
            self._level = None
        spent = time.perf_counter() - t0
        self.parts += 1
        self.work_s += spent
        self._level_s += spent
        if self._level is None:
            self.steps += 1
            self.level_s += self._level_s
            self._level_s = 0.0
        return True

    @property
    def rows(self) -> int:
        """Rows of a draft step drafting the trees ahead, at full width: every guess's frontier."""
        return len(self.leaves) * self.shape.width

    def _grow(self) -> Generator:
        return grow_together(self.builders, self.drafter.step_parts)

    def _start(self) -> Generator:
        """Re-feed the leaves at scratch slots (their own slots are being verified) to guess
        the bonus after each, and root a next tree on each guess after them."""
        s, n = self.start, len(self.leaves)
        scratch = self.slots.take(n)  # the leaves' copies
        kv_len = scratch + n
        contexts = torch.zeros(n, kv_len, dtype=torch.bool, device=self.device)  # [n, kv_len]
        contexts[:, :s] = True  # the committed prefix
        for g, path in enumerate(self.paths):
            contexts[g, s + path[:-1]] = True  # the root and the path above the leaf
            contexts[g, scratch + g] = True  # the leaf's copy
        depth = self.tree.depth  # every leaf's
        positions = torch.full((n,), s + depth, device=self.device)
        slots = scratch + torch.arange(n, device=self.device)
        logits = yield from self.drafter.step_parts(
            self.tree.tokens[self.leaves], positions, slots, contexts, kv_len
        )  # [n, V]
        _, best = self.propose(logits, torch.full((n,), depth, device=self.device), 1)
        self.guesses = best[:, 0].tolist()
        shape, propose = self.shape, self.propose.after(depth + 1)
        for guess, context in zip(self.guesses, contexts, strict=True):
            base = self.slots.take(1 + self.room * shape.width)  # the tree, deepened to its room
            b = TreeBuilder(
                guess, shape.depth, shape.width, propose, self.drafter.step,
                self.device, base=base, pos0=s + depth + 1,
                context=torch.cat([context, context.new_zeros(base - kv_len)]), room=self.room,
            )  # fmt: skip
            self.builders.append(b)

    def _guesses_and_room(self, leaves: int) -> tuple[int, int]:
        """How many guesses to draft ahead on, and how deep each tree may grow: once at the
        chosen depth, in waits that would otherwise idle, as deep as the KV cache allows when
        the depth is chosen per round. Fewer guesses when the slots after the current tree
        cannot hold that many trees of the chosen depth (the cache is sized for one:
        SpecConfig.cache_slots, and the round's slots refuse a tree past it)."""
        spec, width = self.spec, self.shape.width
        if spec.depth is not None:
            most = self.shape.depth  # a fixed depth stays fixed
        else:  # no deeper, nor with more nodes, than a tree the chooser may pick
            most = min(spec.max_depth, (spec.tree_size - 1) // width)
        free = self.slots.free  # slots after the current tree
        for n in range(min(spec.guesses, leaves), 1, -1):
            room = min(most, (free // n - 2) // width)  # a leaf copy and a tree per guess
            if room >= self.shape.depth:
                return n, room
        return 1, max(self.shape.depth, min(most, (free - 2) // width))

    def take(self, accepted: list[int], bonus: int) -> TreeBuilder | None:
        """The next tree's builder, its draft KV moved to the next round's slots, when the
        walk accepted exactly a guessed path (`accepted`: the verified tree's node indices,
        root excluded) and drew the bonus guessed after it; else None."""
        if not self.builders:  # the pass ended before the leaves were re-fed
            return None
        for path, guess, b in zip(self.paths, self.guesses, self.builders, strict=True):
            if bonus == guess and accepted == path[1:].tolist():
                next_start = self.start + 1 + len(accepted)  # the committed length after it
                slots = torch.arange(b.base, b.base + b.n, device=self.device)
                self.drafter.relocate(slots, next_start)
                b.rebase(next_start)
                return b
        return None

"""Drafting the next round's tree while the target's verification pass waits for weights.

The guess: the target accepts the current tree's best path whole, then picks the draft's own
top token after it as the bonus. The next tree is grown from that guess in the cache slots
after the current tree, in the gaps of the verification pass; after the walk it is kept only
when the guess came true (so it changes what is proposed, never what is emitted).

The drafting runs a part per call of `work()`: one decoder layer of a draft step (see
Drafter.step_parts), so a wait is filled up to its end and delays the pass by at most a
part, and a level runs on across waits. A part starts only in a wait expected to last at
least MIN_FILL of a part. A level still unfinished when the pass ends is dropped. Once the
tree has its chosen depth, waits that would otherwise idle deepen it, level by level, as far
as the KV cache allows (only where the depth is chosen per round: a fixed depth stays fixed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator

import torch

from subspec.config import SpecConfig
from subspec.spec.shape import Shape
from subspec.spec.tree import Tree, TreeBuilder

MIN_FILL = 0.5  # the share of a part a wait must be expected to fill to start one


class Lookahead:
    """The next round's tree, drafted ahead of the walk on a guess about its outcome."""

    def __init__(self, drafted: Tree, start: int, spec: SpecConfig, shape: Shape, drafter,
                 device):  # fmt: skip
        """`shape`: the next tree's; `drafter`: its step and step_parts draft the levels."""
        self.drafted, self.start, self.spec, self.shape = drafted, start, spec, shape
        self.drafter, self.device = drafter, device
        last = drafted.depths == drafted.depths.max()
        scores = torch.where(last, drafted.scores, torch.full_like(drafted.scores, -torch.inf))
        self.leaf = int(scores.argmax())  # the end of the best full-depth path
        self.path = drafted.ancestors[self.leaf].nonzero().flatten()  # root .. leaf
        self.scratch = start + drafted.size  # first slot after the tree as drafted
        self.builder: TreeBuilder | None = None
        self.guess: int | None = None
        self._level: Generator | None = None  # the level being drafted, part by part
        self.work_s, self.parts = 0.0, 0  # every part run
        self.level_s, self.steps = 0.0, 0  # the levels completed (the guess's step included)
        self._level_s = 0.0  # seconds so far of the level being drafted

    def work(self, expected_wait_s: float = math.inf) -> bool:
        """Draft one part of the next tree (the first level guesses its root) if the wait is
        expected to last MIN_FILL of a part; False when it drafted nothing (also once the tree
        is complete and as deep as it may grow)."""
        b = self.builder
        if self._level is None and b is not None and b.done and not b.can_deepen:
            return False
        if self.parts and expected_wait_s < MIN_FILL * self.work_s / self.parts:
            return False
        t0 = time.perf_counter()
        if self._level is None:
            self._level = self._start() if self.builder is None else self._grow()
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

    def _grow(self) -> Generator:
        b = self.builder
        return (b.deepen_parts if b.done else b.step_parts)(self.drafter.step_parts)

    def _start(self) -> Generator:
        """Re-feed the leaf at the scratch slot (its own slot is being verified) to guess the
        bonus, and root the next tree there, one slot further on."""
        s, leaf = self.start, self.leaf
        kv_len = self.scratch + 1
        context = torch.zeros(kv_len, dtype=torch.bool, device=self.device)  # [kv_len]
        context[:s] = True  # the committed prefix
        context[s + self.path[:-1]] = True  # the root and the path above the leaf
        context[self.scratch] = True  # the leaf's copy
        depth = int(self.drafted.depths[leaf])
        position = torch.tensor([s + depth], device=self.device)
        slot = torch.tensor([self.scratch], device=self.device)
        logits = yield from self.drafter.step_parts(
            self.drafted.tokens[leaf : leaf + 1], position, slot, context[None], kv_len
        )
        self.guess = int(logits[0].argmax())
        spec = self.spec
        self.builder = TreeBuilder(
            self.guess, self.shape.depth, self.shape.width, spec.draft_temperature,
            self.drafter.step, self.device, base=kv_len, pos0=s + depth + 1, context=context,
            room=self._room(),
        )  # fmt: skip

    def _room(self) -> int:
        """How deep the tree may grow once drafted to the chosen depth, in waits that would
        otherwise idle: as deep as the KV cache allows when the depth is chosen per round."""
        if self.spec.depth is not None:
            return self.shape.depth
        return min(self.spec.max_depth, (self.spec.tree_size - 1) // self.shape.width)

    def take(self, accepted: list[int], bonus: int) -> TreeBuilder | None:
        """The next tree's builder, its draft KV moved to the next round's slots, when the
        walk accepted exactly the guessed path (`accepted`: drafted node indices, root
        excluded) and drew the guessed bonus; else None."""
        b = self.builder
        if b is None or bonus != self.guess or accepted != self.path[1:].tolist():
            return None
        next_start = self.start + 1 + len(accepted)  # the committed length after this round
        self.drafter.relocate(torch.arange(b.base, b.base + b.n, device=self.device), next_start)
        b.rebase(next_start)
        return b

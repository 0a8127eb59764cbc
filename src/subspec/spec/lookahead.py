"""Drafting the next round's tree while the target's verification pass waits for weights.

The guess: the target accepts the current tree's best path whole, then picks the draft's own
top token after it as the bonus. The next tree is grown from that guess in the cache slots
after the current tree, one level per call of `work()`, in the gaps of the verification pass;
after the walk it is kept only when the guess came true (so it changes what is proposed,
never what is emitted). A level is started only in a wait expected to last at least
MIN_FILL of a draft step: where the target's compute keeps up with its transfers (the waits
are short), a level started in a gap would mostly delay the pass.
"""

from __future__ import annotations

import math
import time

import torch

from subspec.config import SpecConfig
from subspec.spec.shape import Shape
from subspec.spec.tree import DraftStep, Tree, TreeBuilder

MIN_FILL = 0.5  # the share of a draft step a wait must be expected to fill to start one


class Lookahead:
    """The next round's tree, drafted ahead of the walk on a guess about its outcome."""

    def __init__(
        self, drafted: Tree, start: int, spec: SpecConfig, shape: Shape, step: DraftStep, device,
        step_s: float | None = None,
    ):  # fmt: skip
        """`shape`: the next tree's; `step_s`: a draft step's expected seconds, if known."""
        self.drafted, self.start, self.spec, self.shape = drafted, start, spec, shape
        self.step_s = step_s
        self.step_fn, self.device = step, device
        last = drafted.depths == drafted.depths.max()
        scores = torch.where(last, drafted.scores, torch.full_like(drafted.scores, -torch.inf))
        self.leaf = int(scores.argmax())  # the end of the best full-depth path
        self.path = drafted.ancestors[self.leaf].nonzero().flatten()  # root .. leaf
        self.scratch = start + drafted.size  # first slot after the tree as drafted
        self.builder: TreeBuilder | None = None
        self.guess: int | None = None
        self.work_s, self.steps = 0.0, 0

    def work(self, expected_wait_s: float = math.inf) -> bool:
        """Draft one level of the next tree (the first call guesses its root) if the wait is
        expected to last MIN_FILL of a step; False when it drafted nothing (also once the tree
        is complete)."""
        if self.builder is not None and self.builder.done:
            return False
        step_s = self.work_s / self.steps if self.steps else self.step_s
        if step_s is not None and expected_wait_s < MIN_FILL * step_s:
            return False
        t0 = time.perf_counter()
        if self.builder is None:
            self._start()
        else:
            self.builder.step()
        self.steps += 1
        self.work_s += time.perf_counter() - t0
        return True

    def _start(self) -> None:
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
        logits = self.step_fn(self.drafted.tokens[leaf : leaf + 1], position, slot,
                              context[None], kv_len)  # fmt: skip
        self.guess = int(logits[0].argmax())
        spec = self.spec
        self.builder = TreeBuilder(
            self.guess, self.shape.depth, self.shape.width, spec.draft_temperature, self.step_fn,
            self.device, base=kv_len, pos0=s + depth + 1, context=context,
        )  # fmt: skip

    def take(self, accepted: list[int], bonus: int, drafter) -> TreeBuilder | None:
        """The next tree's builder, its draft KV moved to the next round's slots, when the
        walk accepted exactly the guessed path (`accepted`: drafted node indices, root
        excluded) and drew the guessed bonus; else None."""
        b = self.builder
        if b is None or bonus != self.guess or accepted != self.path[1:].tolist():
            return None
        next_start = self.start + 1 + len(accepted)  # the committed length after this round
        drafter.relocate(torch.arange(b.base, b.base + b.n, device=self.device), next_start)
        b.rebase(next_start)
        return b

"""Choosing each round's tree shape (depth D, width k) from what this generation has measured.

Expected tokens per round, E(D, k) = 1 + sum over d <= D of S_k(d), where S_k(d) is the share
of rounds whose tree reached depth d that accepted at least d tokens with a width-k tree
(beyond the deepest depth seen, S decays at the last observed per-depth rate). A round drafted
at width k also tells what a narrower tree would have accepted: level by level the nodes are
kept best first, so a narrower tree holds the accepted path up to its first node ranked k' or
lower (`accepted_by_width`); a narrower round counts for a wider tree with its own
acceptance, a lower bound. A round costs its draft steps in the open at width k (each width's
mean step time, as measured) plus a verification pass: the pass's mean wall time (drafting
ahead in its waits included) while its compute, grown with the tree's size, stays hidden
behind the transfers it waited for (a part per pass, the rebuild of the streamed weights, and
a part per node, fitted over the rounds). The steps in the open are D, less those drafted ahead in
the previous pass's waits when its guess came true (speculative/lookahead.py): that takes a round
accepting its whole tree, S_k(D), and a guess being right then, as measured (the share of
such rounds that found their next tree drafted ahead); a pass drafts ahead as many levels as
its free time (its waits) holds, at the measured time of a step drafting ahead (all guesses'
frontiers at once). The shape with the most tokens per second wins among those with no more
nodes than the KV cache was sized for (spec.tree_size) and at most DEEPEN_BY levels deeper
than any tree drafted so far, re-chosen after every round; every EXPLORE_EVERY rounds the
widest tree runs once, so that every width's acceptance keeps being measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from subspec.config import SpecConfig

START_DEPTH = 16  # before anything is measured (the CPU shape measured best, BENCHMARKS.md)
START_WIDTH = 2
MAX_RATE = 0.98  # the per-depth acceptance rate an extrapolation may assume at most
EXPLORE_EVERY = 8  # rounds between two rounds at the widest width, under width auto
# the most levels a tree may go past the deepest one drafted so far: beyond it acceptance is
# extrapolated, and a tree twice as deep as any seen cost a whole round of open drafting
# (on the Zen 4 VM the chooser jumped from 16 to 32 levels after three rounds)
DEEPEN_BY = 4


@dataclass(frozen=True)
class Shape:
    depth: int
    width: int


def accepted_by_width(origin: torch.Tensor, width: int) -> list[int]:
    """Accepted lengths a tree of width 1 .. `width` would have given: `origin` [a] holds
    the accepted nodes' indices as drafted (level L's nodes are 1 + (L - 1) width + rank)."""
    ranks = ((origin - 1) % width).tolist()  # [a], rank of each accepted node in its level
    lengths = []
    for k in range(1, width + 1):
        lengths.append(next((d for d, r in enumerate(ranks) if r >= k), len(ranks)))
    return lengths


class ShapeChooser:
    """The tree shape for the next round: spec.depth / spec.width where fixed, else chosen
    from costs (see the module docstring)."""

    def __init__(self, spec: SpecConfig):
        self.fixed_depth, self.fixed_width = spec.depth, spec.width
        self.max_depth, self.max_width = spec.max_depth, spec.max_width
        self.max_nodes = spec.tree_size  # what the KV cache was sized for
        # (depth, accepted lengths by width 1 .. the round's width) of each round
        self.rounds: list[tuple[int, list[int]]] = []
        self.step_s: dict[int, float] = {}  # width -> draft seconds, in the open and ahead
        self.steps: dict[int, int] = {}  # width -> draft steps
        self.verify: list[tuple[int, float, float]] = []  # (tree size, pass s, free s)
        # with overlap: rounds that accepted their whole tree, those of them whose next tree
        # was drafted ahead; passes drafting ahead, and their time free for it in all
        self.whole_rounds, self.whole_hits = 0, 0
        self.ahead_passes, self.free_s = 0, 0.0
        self.ahead_rows: int | None = None  # rows of a draft step drafting ahead

    def observe_steps(self, width: int, seconds: float, steps: int) -> None:
        if not steps:
            return
        self.step_s[width] = self.step_s.get(width, 0.0) + seconds
        self.steps[width] = self.steps.get(width, 0) + steps

    def observe_round(self, depth: int, accepted: list[int], tree_size: int, pass_s: float,
                      free_s: float) -> None:  # fmt: skip
        """`accepted`: accepted lengths by width (accepted_by_width); `pass_s`: the
        verification pass's wall time, drafting ahead inside it included (the pass takes as
        long whether its waits draft or idle); `free_s`: its time not spent on the target's
        compute (waits for weights, drafting ahead included)."""
        self.rounds.append((depth, accepted))
        self.verify.append((tree_size, pass_s, free_s))

    def observe_lookahead(self, whole: bool, hit: bool, free_s: float,
                          rows: int | None = None) -> None:  # fmt: skip
        """A round run with a tree drafted ahead in its pass: `whole`: it accepted its whole
        tree; `hit`: the next tree drafted ahead came true; `free_s`: the pass's waits for
        weights, drafting ahead included; `rows`: a draft step's rows there (all guesses'
        frontiers; None: the width's)."""
        self.ahead_rows = rows
        self.whole_rounds += whole
        self.whole_hits += whole and hit
        self.ahead_passes += 1
        self.free_s += free_s

    def shape(self) -> Shape:
        widths = [self.fixed_width] if self.fixed_width else range(1, self.max_width + 1)
        if len(self.rounds) < 2 or not self.steps:
            return Shape(self.fixed_depth or min(START_DEPTH, self.max_depth),
                         self.fixed_width or START_WIDTH)  # fmt: skip
        if not self.fixed_width and len(self.rounds) % EXPLORE_EVERY == 2:
            widths = [self.max_width]  # (a shallower tree: the node count is capped)
        deepest = min(self.max_depth, max(d for d, _ in self.rounds) + DEEPEN_BY)
        depths = [self.fixed_depth] if self.fixed_depth else range(1, deepest + 1)
        best, best_rate = Shape(1, 1), -1.0
        pass_s = self._pass_model()
        for k in widths:
            # tokens[d] = E(d, k) = 1 + S_k(1) + ... + S_k(d)
            survival, step = self._survival(k), self._step(k)
            tokens = list(accumulate(survival[1:], initial=1.0))
            open_steps = self._open_steps(survival, self._step(self.ahead_rows or k))
            for d in (d for d in depths if 1 + d * k <= self.max_nodes):
                rate = tokens[d] / (open_steps(d) * step + pass_s(1 + d * k))
                if rate > best_rate:
                    best, best_rate = Shape(d, k), rate
        return best

    def _pass_model(self):
        """A verification pass's expected time as a function of the tree's node count: its
        mean wall time, or its compute where that is longer. The compute is fitted as a part
        per pass (the streamed weights' rebuild, inside the matmuls, whatever the tree) and a
        part per node, by least squares over the rounds; proportional to the node count until
        rounds of different sizes tell them apart."""
        v_mean = sum(v[1] for v in self.verify) / len(self.verify)
        fixed, per_node = _line([(n, max(pass_s - free_s, 0.0)) for n, pass_s, free_s
                                 in self.verify])  # fmt: skip
        return lambda tree_size: max(v_mean, fixed + per_node * tree_size)

    def _open_steps(self, survival: list[float], ahead_step: float):
        """The expected draft steps in the open of a depth-d tree, as a function of d: d, less
        the levels a pass drafts ahead (steps of `ahead_step` seconds, the first of which
        guesses the next roots) in the rounds whose guess comes true."""
        if not self.ahead_passes:
            return lambda d: d
        right = self.whole_hits / self.whole_rounds if self.whole_rounds else 0.0
        ahead = max(self.free_s / self.ahead_passes / ahead_step - 1.0, 0.0)
        return lambda d: d - survival[d] * right * min(d, ahead)

    def _step(self, width: int) -> float:
        """Mean draft step time at `width`: measured, else the nearest measured width's."""
        nearest = min(self.steps, key=lambda k: (abs(k - width), -k))
        return self.step_s[nearest] / self.steps[nearest]

    def _survival(self, width: int) -> list[float]:
        """S_width(d) for d = 0 .. max_depth, non-increasing (see the module docstring). A
        round narrower than `width` counts with its own acceptance: a lower bound."""
        seen = [(depth, acc[min(width, len(acc)) - 1]) for depth, acc in self.rounds]
        s, deepest = [1.0], max(d for d, _ in seen)
        for d in range(1, deepest + 1):
            reached = [a for depth, a in seen if depth >= d]
            s.append(min(s[-1], sum(a >= d for a in reached) / len(reached)))
        rate = min(s[-1] / s[-2] if s[-2] > 0 else 0.0, MAX_RATE)
        while len(s) <= self.max_depth:
            s.append(s[-1] * rate)
        return s


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) >= 0 of y = a + b x fitted to `points` by least squares; through the origin
    (a = 0) when the x do not vary or the fit would go below zero at either end."""
    n = len(points)
    x_mean = sum(x for x, _ in points) / n
    y_mean = sum(y for _, y in points) / n
    spread = sum((x - x_mean) ** 2 for x, _ in points)
    if spread > 0:
        b = sum((x - x_mean) * (y - y_mean) for x, y in points) / spread
        a = y_mean - b * x_mean
        if a >= 0 and b >= 0:
            return a, b
    return 0.0, y_mean / x_mean

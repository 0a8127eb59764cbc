"""Choosing each round's tree depth from what this generation has measured.

Expected tokens per round, E(D) = 1 + sum over d <= D of S(d), where S(d) is the share of
rounds whose tree reached depth d that accepted at least d tokens (beyond the deepest depth
seen, S decays at the last observed per-depth rate). A round costs D draft steps plus a
verification pass: the pass's mean time while its compute, grown with the tree's size,
stays hidden behind the transfers it waited for. The depth with the most tokens per second
wins, re-chosen after every round.
"""

from __future__ import annotations

from subspec.config import SpecConfig

START_DEPTH = 16  # before anything is measured (the CPU shape measured best, BENCHMARKS.md)
MAX_RATE = 0.98  # the per-depth acceptance rate an extrapolation may assume at most


class DepthChooser:
    """The tree depth for the next round: spec.depth when fixed, else chosen from costs."""

    def __init__(self, spec: SpecConfig):
        self.fixed, self.width, self.max_depth = spec.depth, spec.width, spec.max_depth
        self.rounds: list[tuple[int, int]] = []  # (depth, accepted) of each round
        self.step_s = self.steps = 0.0  # draft time and steps (in the open and ahead)
        self.verify: list[tuple[int, float, float]] = []  # (tree size, pass s, wait s)

    def observe(self, depth: int, accepted: int, draft_s: float, steps: int, tree_size: int,
                verify_s: float, wait_s: float) -> None:  # fmt: skip
        self.rounds.append((depth, accepted))
        self.step_s += draft_s
        self.steps += steps
        self.verify.append((tree_size, verify_s, wait_s))

    def depth(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if len(self.rounds) < 2 or not self.steps:
            return min(START_DEPTH, self.max_depth)
        survival = self._survival()
        step = self.step_s / self.steps
        n_mean = sum(v[0] for v in self.verify) / len(self.verify)
        v_mean = sum(v[1] for v in self.verify) / len(self.verify)
        compute = max(v_mean - sum(v[2] for v in self.verify) / len(self.verify), 0.0)
        best, best_rate, tokens = 1, 0.0, 1.0
        for d in range(1, self.max_depth + 1):
            tokens += survival[d]
            n = 1 + d * self.width
            cost = d * step + max(v_mean, compute * n / n_mean)
            if tokens / cost > best_rate:
                best, best_rate = d, tokens / cost
        return best

    def _survival(self) -> list[float]:
        """S(d) for d = 0 .. max_depth, non-increasing (see the module docstring)."""
        s, deepest = [1.0], max(d for d, _ in self.rounds)
        for d in range(1, deepest + 1):
            reached = [a for depth, a in self.rounds if depth >= d]
            s.append(min(s[-1], sum(a >= d for a in reached) / len(reached)))
        rate = min(s[-1] / s[-2] if s[-2] > 0 else 0.0, MAX_RATE)
        while len(s) <= self.max_depth:
            s.append(s[-1] * rate)
        return s

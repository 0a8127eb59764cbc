"""The draft token tree as data, and the level-by-level builder that grows it.

Node 0 is the root: the last committed token, not yet in the cache. Node j lives in cache
slot `start + j` during a round; its RoPE position is `start + depth[j]`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from subspec.speculative.proposals import Proposal, Ranked


@dataclass
class Tree:
    """A flattened tree of n nodes, parents before children."""

    tokens: torch.Tensor  # [n] token ids
    parents: torch.Tensor  # [n] parent node index, -1 for the root
    depths: torch.Tensor  # [n] 0 for the root
    ancestors: torch.Tensor  # [n, n] bool: ancestors[i, j] = j is i or an ancestor of i
    scores: torch.Tensor  # [n] fp32 path log-probability under the draft (root 0)
    origin: torch.Tensor  # [n] index of each node in the tree as drafted (its draft KV slot)

    @property
    def size(self) -> int:
        return self.tokens.numel()

    @property
    def depth(self) -> int:
        """The deepest node's depth (parents come first, so it is the last node's)."""
        return int(self.depths[-1])

    def positions(self, start: int) -> torch.Tensor:
        return start + self.depths

    def slots(self, start: int) -> torch.Tensor:
        return start + torch.arange(self.size, device=self.tokens.device)

    def mask(self, start: int) -> torch.Tensor:
        """[n, start + n] bool: every node sees the prefix, its ancestors and itself."""
        prefix = torch.ones(self.size, start, dtype=torch.bool, device=self.tokens.device)
        return torch.cat([prefix, self.ancestors], dim=1)

    def prune(self, keep: int) -> Tree:
        """The `keep` best-scoring nodes and their ancestors (a path's score never exceeds
        its parent's, so this is a subtree), renumbered in the same parent-first order."""
        if keep >= self.size:
            return self
        best = torch.topk(self.scores, keep).indices  # the root scores 0, the maximum
        kept = self.ancestors[best].any(0)  # [n] selected nodes and all their ancestors
        new_index = torch.cumsum(kept, 0) - 1  # [n] position of each kept node
        parents = self.parents[kept]
        parents = torch.where(parents >= 0, new_index[parents.clamp(min=0)], parents)
        return Tree(
            self.tokens[kept], parents, self.depths[kept], self.ancestors[kept][:, kept],
            self.scores[kept], self.origin[kept],
        )  # fmt: skip


# A draft forward: (tokens [t], positions [t], slots [t], mask [t, kv_len], kv_len) -> logits [t, V]
DraftStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
# The same, a part per next(), returning the logits (Drafter.step_parts)
DraftParts = Callable[..., Generator[None, None, torch.Tensor]]


class TreeBuilder:
    """Grows a tree by drafting level by level and keeping the global top-`width` paths; one
    `step()` drafts one level, so drafting can be interleaved with other work.

    Path scores are cumulative log-probabilities, in fp32, of each child being accepted as
    `propose` scores it (speculative/proposals.py: the draft's best tokens greedy, the
    target's coming samples when sampling).
    Node j is drafted at cache slot `base + j` with RoPE position `pos0 + depth[j]`; every
    node attends to the slots before `base` that `context` ([base] bool, None = all) marks,
    its ancestors and itself. `room` (default `depth`) is the depth `grow_together()` may
    take it to.
    """

    def __init__(self, root: int, depth: int, width: int, propose: Proposal, step: DraftStep,
                 device, base: int, pos0: int | None = None, context=None,
                 room: int | None = None):  # fmt: skip
        self.depth, self.width, self.propose, self.step_fn = depth, width, propose, step
        self.device, self.base = device, base
        self.pos0 = base if pos0 is None else pos0
        self.context = context  # [base] bool or None
        self.room = max(depth, room or depth)
        n_max = 1 + self.room * width
        self.tokens = torch.empty(n_max, dtype=torch.long, device=device)
        self.parents = torch.full((n_max,), -1, dtype=torch.long, device=device)
        self.depths = torch.zeros(n_max, dtype=torch.long, device=device)
        self.anc = torch.zeros(n_max, n_max, dtype=torch.bool, device=device)
        self.path_scores = torch.zeros(n_max, dtype=torch.float32, device=device)
        self.tokens[0], self.anc[0, 0] = root, True
        self.frontier = torch.zeros(1, dtype=torch.long, device=device)  # nodes to expand
        self.scores = torch.zeros(1, dtype=torch.float32, device=device)  # their path log-probs
        self.n, self.level = 1, 0

    @property
    def capacity(self) -> int:
        """The cache slots from `base` that its nodes may take, deepened to its room."""
        return self.tokens.numel()

    @property
    def size(self) -> int:
        """The nodes of the tree drafted to its depth."""
        return 1 + self.depth * self.width

    @property
    def done(self) -> bool:
        return self.level == self.depth

    @property
    def can_deepen(self) -> bool:
        return self.depth < self.room

    @property
    def can_grow(self) -> bool:
        """A level is left to draft: short of its depth, or able to deepen past it."""
        return not self.done or self.can_deepen

    def rebase(self, base: int) -> None:
        """The nodes drafted so far now sit at `base + j` (and so does their position 0):
        the context becomes every slot before it."""
        self.base = self.pos0 = base
        self.context = None

    def step(self) -> None:
        """Draft one level: expand the frontier, keep the best `width` children."""
        self.add_level(self.step_fn(*self.level_inputs()))

    def level_inputs(self) -> tuple:
        """The draft step's arguments for the frontier: tokens, positions, slots, mask, kv_len."""
        f, n, base = self.frontier.numel(), self.n, self.base
        if self.context is None:
            prefix = torch.ones(f, base, dtype=torch.bool, device=self.device)
        else:
            prefix = self.context[None].expand(f, base)
        mask = torch.cat([prefix, self.anc[self.frontier, :n]], dim=1)  # [f, base + n]
        return (self.tokens[self.frontier], self.pos0 + self.depths[self.frontier],
                base + self.frontier, mask, base + n)  # fmt: skip

    def add_level(self, logits: torch.Tensor) -> None:
        """Add the level that the frontier's draft logits [f, V] give."""
        n, w = self.n, self.width
        # the global top-`width` paths are among each frontier node's top-`width` children
        child_logp, child_tokens = self.propose(logits, self.depths[self.frontier], w)  # [f, w]
        cand = (self.scores[:, None] + child_logp).flatten()  # [f * w]
        self.scores, flat = torch.topk(cand, w)
        new = torch.arange(n, n + w, device=self.device)
        parent = self.frontier[flat // w]
        self.tokens[new], self.parents[new] = child_tokens.flatten()[flat], parent
        self.depths[new] = self.level + 1
        self.path_scores[new] = self.scores
        self.anc[new] = self.anc[parent]
        self.anc[new, new] = True
        self.frontier, self.n, self.level = new, n + w, self.level + 1

    def tree(self) -> Tree:
        """The tree drafted so far."""
        n = self.n
        origin = torch.arange(n, device=self.device)
        return Tree(self.tokens[:n], self.parents[:n], self.depths[:n], self.anc[:n, :n],
                    self.path_scores[:n], origin)  # fmt: skip


def grow_together(builders: list[TreeBuilder], parts: DraftParts) -> Generator[None, None, None]:
    """One more level of each builder that has one to grow, in a single draft step (one
    weight read for all their frontiers) run through `parts` (see Drafter.step_parts), a part
    per next(): the next level of a builder short of its depth, else a level past it where
    it can_deepen (its depth grows once the level is drafted). Abandoned before its end, it
    leaves every builder as it was."""
    growing = [b for b in builders if b.can_grow]
    inputs = [b.level_inputs() for b in growing]
    tokens, positions, slots, masks, kv_lens = zip(*inputs, strict=True)
    kv_len = max(kv_lens)
    padded = [F.pad(m, (0, kv_len - m.shape[1])) for m in masks]  # [frontier, kv_len] each
    logits = yield from parts(
        torch.cat(tokens), torch.cat(positions), torch.cat(slots), torch.cat(padded), kv_len
    )  # [sum of the frontiers, V]
    row = 0
    for b, frontier in zip(growing, tokens, strict=True):
        deepen = b.done
        b.add_level(logits[row : row + frontier.numel()])
        row += frontier.numel()
        b.depth += deepen


def build_tree(
    root: int, start: int, depth: int, width: int, temperature: float, step: DraftStep, device
) -> Tree:
    """A whole tree of `depth` levels rooted at slot and position `start` (see TreeBuilder)."""
    builder = TreeBuilder(root, depth, width, Ranked(temperature), step, device, base=start)
    while not builder.done:
        builder.step()
    return builder.tree()

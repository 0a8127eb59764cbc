"""The draft token tree as data, and the level-by-level builder that grows it.

Node 0 is the root: the last committed token, not yet in the cache. Node j lives in cache
slot `start + j` during a round; its RoPE position is `start + depth[j]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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


def build_tree(
    root: int, start: int, depth: int, width: int, temperature: float, step: DraftStep, device
) -> Tree:
    """Grow a tree by drafting level by level and keeping the global top-`width` paths.

    Path scores are cumulative log-probabilities of softmax(logits / temperature), in fp32.
    """
    n_max = 1 + depth * width
    tokens = torch.empty(n_max, dtype=torch.long, device=device)
    parents = torch.full((n_max,), -1, dtype=torch.long, device=device)
    depths = torch.zeros(n_max, dtype=torch.long, device=device)
    anc = torch.zeros(n_max, n_max, dtype=torch.bool, device=device)
    path_scores = torch.zeros(n_max, dtype=torch.float32, device=device)
    tokens[0], anc[0, 0] = root, True
    frontier = torch.zeros(1, dtype=torch.long, device=device)  # node indices being expanded
    scores = torch.zeros(1, dtype=torch.float32, device=device)  # their path log-probs
    n = 1
    for d in range(depth):
        kv_len = start + n
        mask = torch.cat(
            [
                torch.ones(frontier.numel(), start, dtype=torch.bool, device=device),
                anc[frontier, :n],
            ],
            dim=1,
        )  # fmt: skip  [f, start + n]
        logits = step(tokens[frontier], start + depths[frontier], start + frontier, mask, kv_len)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [f, V]
        # the global top-`width` paths are among each frontier node's top-`width` children
        child_logp, child_tokens = logp.topk(width, dim=-1)  # [f, width]
        cand = (scores[:, None] + child_logp).flatten()  # [f * w]
        scores, flat = torch.topk(cand, width)
        new = torch.arange(n, n + width, device=device)
        parent = frontier[flat // width]
        tokens[new], parents[new], depths[new] = child_tokens.flatten()[flat], parent, d + 1
        path_scores[new] = scores
        anc[new] = anc[parent]
        anc[new, new] = True
        frontier, n = new, n + width
    origin = torch.arange(n, device=device)
    return Tree(tokens[:n], parents[:n], depths[:n], anc[:n, :n], path_scores[:n], origin)

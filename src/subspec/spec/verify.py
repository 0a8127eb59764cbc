"""Verification of a drafted tree against the target's logits: the walk from the root."""

from __future__ import annotations

import torch

from subspec.config import SamplingConfig
from subspec.spec.sampling import target_probs
from subspec.spec.tree import Tree


def walk(
    tree: Tree, logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None
) -> tuple[list[int], int]:
    """Follow the target's own choices down the tree.

    logits: [n, V] target logits at every node. At each node the target's token is drawn
    (argmax when greedy, an exact sample of its processed distribution otherwise); if a child
    carries it the walk moves there, else it is the bonus token and the walk stops. Returns
    (accepted node indices, root excluded, in path order; the bonus token). Every emitted
    token is the target's choice, so the output distribution is exactly the target's.
    """
    child = {
        (p, t): i
        for i, (p, t) in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist(), strict=True))
    }
    greedy_choice = logits.argmax(-1).tolist() if cfg.greedy else None
    node, path = 0, []
    while True:
        if greedy_choice is not None:
            token = greedy_choice[node]
        else:
            probs = target_probs(logits[node][None], cfg)[0]
            token = int(torch.multinomial(probs, 1, generator=gen))
        nxt = child.get((node, token))
        if nxt is None:
            return path, token
        path.append(nxt)
        node = nxt

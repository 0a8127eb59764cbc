"""Verification of a drafted tree against the target's logits: the walk from the root."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subspec.config import SamplingConfig
from subspec.speculative.sampling import target_probs
from subspec.speculative.tree import Tree


@dataclass
class Verdict:
    """A round's outcome: the accepted nodes and the tokens it emits."""

    nodes: torch.Tensor  # [a] accepted node indices (root excluded) in path order, on device
    tokens: list[int]  # the a accepted tokens, then the bonus token

    @property
    def accepted(self) -> int:
        return len(self.tokens) - 1

    @property
    def bonus(self) -> int:
        return self.tokens[-1]


def walk(
    tree: Tree, logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None
) -> Verdict:
    """Follow the target's own choices down the tree.

    logits: [n, V] target logits at every node. At each node the target's token is drawn
    (argmax when greedy, an exact sample of its processed distribution otherwise); if a child
    carries it the walk moves there, else it is the bonus token and the walk stops. Every
    emitted token is the target's choice, so the output distribution is exactly the target's.
    """
    return _greedy(tree, logits) if cfg.greedy else _sampled(tree, logits, cfg, gen)


def _greedy(tree: Tree, logits: torch.Tensor) -> Verdict:
    """The greedy walk as tensor ops: one device-to-host copy per round.

    Node i is accepted iff it and each of its ancestors is the target's argmax at its parent
    (siblings carry distinct tokens, so the accepted nodes form one path from the root)."""
    choice = logits.argmax(-1)  # [n]
    match = tree.tokens == choice[tree.parents.clamp(min=0)]  # [n]
    match[0] = True
    ok = ~(tree.ancestors & ~match).any(1)  # [n] the node and all its ancestors match
    last = torch.where(ok, tree.depths, -1).argmax()  # the deepest accepted node
    on_path = tree.ancestors[last]  # [n] root .. last
    order = torch.argsort((~on_path).to(torch.uint8), stable=True)  # path nodes first
    host = torch.cat([tree.depths[last, None], tree.tokens[order], choice[last, None]]).tolist()
    a = host[0]  # accepted nodes = the depth of the last one
    return Verdict(order[1 : a + 1], host[2 : 2 + a] + [host[-1]])


def _sampled(
    tree: Tree, logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None
) -> Verdict:
    """The sampling walk: one draw per visited node, in path order (seed-exact)."""
    parents, tokens = torch.stack([tree.parents, tree.tokens]).tolist()
    child = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens, strict=True))}
    node, path = 0, []
    while True:
        probs = target_probs(logits[node][None], cfg)[0]
        token = int(torch.multinomial(probs, 1, generator=gen))
        nxt = child.get((node, token))
        if nxt is None:
            nodes = torch.tensor(path, dtype=torch.long).to(logits.device)
            return Verdict(nodes, [tokens[i] for i in path] + [token])
        path.append(nxt)
        node = nxt

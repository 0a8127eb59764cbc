"""Which children the draft proposes at a tree node, and how likely each is to be accepted.

Greedy, the target accepts the child that is its argmax, so the draft proposes its own most
probable tokens (`Ranked`). Sampling, the target draws each token with torch.multinomial,
which takes one sample as argmax(p / q), q ~ Exp(1) drawn for every vocabulary entry from the
request's generator (the Gumbel-max trick); vanilla and the verification walk draw once per
emitted token, so the noise of every future draw is fixed by the seed. `Dice` reads it ahead
on a copy of the generator, and `Coupled` proposes argmax(p_draft / q) at a node whose next
token is that draw: the token the target will sample wherever the two distributions agree.
Only what is proposed changes; the walk still draws from the request's generator itself, so
the output stays vanilla's, seed for seed.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from subspec.config import SamplingConfig
from subspec.kernels import native

# a sampled node's kept tokens are looked for among its most probable, then more (Coupled)
CANDIDATES = (64, 1024)


class Proposal(Protocol):
    def __call__(self, logits: torch.Tensor, depths: torch.Tensor, count: int):
        """(log-probability [f, count] fp32 of each child being accepted, token ids
        [f, count]) of the `count` best children of the nodes whose draft logits are `logits`
        [f, V] at tree `depths` [f]."""

    def after(self, levels: int) -> Proposal:
        """The same proposal for a tree rooted `levels` tokens later."""


class Ranked:
    """The draft's most probable tokens, scored by softmax(logits / temperature)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, logits, depths, count):
        top, tokens = logits.topk(count, dim=-1)  # [f, count]
        # the log-softmax keeps each row's order, so only the chosen entries are normalised
        log_total = native.scaled_logsumexp(logits, 1.0 / self.temperature)  # [f]
        return top.float() / self.temperature - log_total[:, None], tokens

    def after(self, levels: int) -> Ranked:
        return self


class Dice:
    """The Gumbel noise of the request's next draws, read ahead on a copy of its generator.

    Draw `first` is the next one the request will make; `advance(n)` once it made n more. A
    row is -log q [V] in fp16 (ranking proposals needs no more: a draft equal to the target
    still proposes its every sample, test_lossless.py), kept until it is drawn. Only the
    `ahead` draws from `first` are read (SpecConfig.draws_ahead, counted in the plan); a draw
    past them reads no noise (its node's children are the draft's best processed tokens)."""

    def __init__(self, gen: torch.Generator, vocab: int, device, ahead: int):
        self.copy = torch.Generator(device=device)
        self.copy.set_state(gen.get_state())
        self.vocab, self.device, self.ahead = vocab, torch.device(device), ahead
        self.first = 0
        self.rows: list[torch.Tensor] = []  # draws first, first + 1, ...

    def gumbel(self, draws: list[int], ids: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 noise of draws `draws` ([f] indices, none before `first`): [f, V], or at the
        token ids `ids` [f, m] of each only ([f, m])."""
        offsets = [d - self.first for d in draws]
        while len(self.rows) <= min(max(offsets), self.ahead - 1):
            self.rows.append(self._draw())
        if max(offsets) >= self.ahead:
            none = torch.zeros(self.vocab, dtype=torch.float16, device=self.device)
        rows = [self.rows[o] if o < self.ahead else none for o in offsets]
        if ids is not None:
            rows = [row[at] for row, at in zip(rows, ids, strict=True)]
        return torch.stack(rows).float()

    def read_ahead(self) -> bool:
        """Draw one more of the `ahead` rows; False when they are all there."""
        if len(self.rows) >= self.ahead:
            return False
        self.rows.append(self._draw())
        return True

    def advance(self, n: int) -> None:
        """The request made n more draws."""
        for _ in range(n - len(self.rows)):
            self._draw()
        del self.rows[:n]
        self.first += n

    def _draw(self) -> torch.Tensor:
        # exactly what torch.multinomial draws from the generator for one sample of [V] fp32
        q = torch.empty(self.vocab, dtype=torch.float32, device=self.device)
        q.exponential_(1, generator=self.copy)
        return q.log_().neg_().to(torch.float16)


class Coupled:
    """Children ranked by what the target will sample: the draft's logits processed as the
    target's are (temperature, top-k, top-p) plus the draw's Gumbel noise; scored by a softmax
    of that at `temperature` in logit units (as Ranked scores the draft's own logits).

    A node's kept tokens are looked for among its CANDIDATES[0] most probable, then, where its
    top-p nucleus reaches past them (a flatter distribution), among its CANDIDATES[1]; past
    those too, all of them count as kept (no sort of the row: at worst it proposes a token the
    target cannot draw, which costs acceptance, never output)."""

    def __init__(self, dice: Dice, sampling: SamplingConfig, temperature: float, first: int):
        self.dice, self.sampling, self.temperature = dice, sampling, temperature
        self.first = first  # the draw of the tree root's next token

    def __call__(self, logits, depths, count):
        draws = self.first + depths  # [f]
        logp, tokens, wide = self._children(logits, draws, count, CANDIDATES[0])
        if bool(wide.any()):
            rows = wide.nonzero().flatten()
            logp[rows], tokens[rows], _ = self._children(logits[rows], draws[rows], count,
                                                         CANDIDATES[1])  # fmt: skip
        return logp, tokens

    def _children(self, logits, draws, count, candidates):
        """(log-probabilities [f, count], tokens [f, count], [f] bool: the row's nucleus
        reaches past its `candidates` most probable tokens)."""
        s, vocab = self.sampling, logits.shape[-1]
        top_k = s.top_k if 0 < s.top_k < vocab else vocab
        top, ids = logits.topk(min(top_k, candidates), dim=-1)  # [f, m] most probable first
        x = top.float() / s.temperature
        kept, wide = _nucleus(x, logits, s, top_k)  # [f, m], [f]
        z = x + self.dice.gumbel(draws.tolist(), ids)
        z = z.masked_fill(~kept, -torch.inf)  # [f, m]
        if count > z.shape[-1]:  # top-k keeps fewer tokens than children are asked for:
            z = F.pad(z, (0, count - z.shape[-1]), value=-torch.inf)  # the rest can never be
            ids = F.pad(ids, (0, count - ids.shape[-1]), value=0)  # accepted
        scale = s.temperature / self.temperature
        best, pos = z.topk(count, dim=-1)
        logp = best * scale - torch.logsumexp(z * scale, -1, keepdim=True)
        return logp, ids.gather(-1, pos), wide

    def after(self, levels: int) -> Coupled:
        return Coupled(self.dice, self.sampling, self.temperature, self.first + levels)


def _nucleus(x: torch.Tensor, logits: torch.Tensor, s: SamplingConfig, top_k: int):
    """([f, m] bool: which of the candidates x [f, m] (logits / temperature of each row's m
    most probable tokens, largest first) sampling.target_probs keeps, all of them where its
    nucleus reaches past them; [f] bool: the rows where it does)."""
    f, m = x.shape
    if s.top_p >= 1.0:
        return torch.ones_like(x, dtype=torch.bool), torch.full((f,), top_k > m)
    if top_k <= m:  # the nucleus of what top-k kept
        log_total = torch.logsumexp(x, -1, keepdim=True)
    else:
        log_total = native.scaled_logsumexp(logits, 1.0 / s.temperature)[:, None]  # [f, 1]
    p = (x - log_total).exp()  # [f, m]
    wide = p.sum(-1) < s.top_p
    kept = (p.cumsum(-1) - p < s.top_p) | wide[:, None]  # the mass before it is short of top-p
    return kept, wide

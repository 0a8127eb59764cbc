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

from subspec.config import SamplingConfig
from subspec.kernels import native

# the top-p nucleus of a sampled node's draft logits is looked for among its most probable tokens
NUCLEUS_CANDIDATES = 64


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

    def gumbel(self, draws: list[int]) -> torch.Tensor:
        """[f, V] fp32: the noise of draws `draws` ([f] indices, none before `first`)."""
        offsets = [d - self.first for d in draws]
        while len(self.rows) <= min(max(offsets), self.ahead - 1):
            self.rows.append(self._draw())
        none = torch.zeros(self.vocab, dtype=torch.float16, device=self.device)
        return torch.stack([self.rows[o] if o < self.ahead else none for o in offsets]).float()

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
    of that at `temperature` in logit units (as Ranked scores the draft's own logits)."""

    def __init__(self, dice: Dice, sampling: SamplingConfig, temperature: float, first: int):
        self.dice, self.sampling, self.temperature = dice, sampling, temperature
        self.first = first  # the draw of the tree root's next token

    def __call__(self, logits, depths, count):
        t = self.sampling.temperature
        x = _processed(logits.float() / t, self.sampling)  # [f, V]
        z = (x + self.dice.gumbel((self.first + depths).tolist())) * (t / self.temperature)
        best, tokens = z.topk(count, dim=-1)  # [f, count]
        return best - z.logsumexp(-1, keepdim=True), tokens

    def after(self, levels: int) -> Coupled:
        return Coupled(self.dice, self.sampling, self.temperature, self.first + levels)


def _processed(x: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """x [f, V] (logits / temperature) with -inf outside top-k and the top-p nucleus, as
    sampling.target_probs keeps them. The nucleus is looked for among the NUCLEUS_CANDIDATES
    largest; only where it reaches past them are the rows sorted whole."""
    vocab = x.shape[-1]
    if 0 < s.top_k < vocab:
        x = x.masked_fill(x < x.topk(s.top_k, dim=-1).values[:, -1:], -torch.inf)
    if s.top_p < 1.0:
        log_total = x.logsumexp(-1, keepdim=True)  # [f, 1]
        top = x.topk(min(NUCLEUS_CANDIDATES, vocab), dim=-1).values  # [f, m] largest first
        p = (top - log_total).exp()
        if bool((p.sum(-1) < s.top_p).any()):
            top = x.sort(dim=-1, descending=True).values  # [f, V]
            p = (top - log_total).exp()
        inside = p.cumsum(-1) - p < s.top_p  # the mass before it is short of top-p
        lowest = top.masked_fill(~inside, torch.inf).min(-1, keepdim=True).values  # [f, 1]
        x = x.masked_fill(x < lowest, -torch.inf)
    return x

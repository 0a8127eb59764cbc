"""Log probabilities of the committed tokens under the target's own distribution.

They are taken from the logits the target computed to choose each token (the verification
pass's, for a speculative round), before temperature, top-k and top-p, as OpenAI reports them.
Each row is reduced alone, so with exact numerics, where a row's logits are the same bits in a
tree as in sequential decoding, the log probabilities are too, whatever the method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subspec.speculative.decoding import Batch

MAX_TOP_LOGPROBS = 20  # as OpenAI's API


@dataclass(frozen=True)
class TokenLogprob:
    """A committed token's log probability and the `top` most likely tokens at its place."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log probability), most likely first


def batch_logprobs(batch: Batch, n: int, top: int) -> list[TokenLogprob]:
    """The first n tokens of `batch`, each with its `top` (0..MAX_TOP_LOGPROBS) alternatives."""
    rows = batch.token_logits()[:n]  # [n, V]
    return [_entry(rows[i], batch.tokens[i], top) for i in range(n)]


def _entry(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logp = logits.float().contiguous().log_softmax(-1)  # [V], this row alone
    best = logp.topk(top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best else []
    return TokenLogprob(token, float(logp[token]), pairs)

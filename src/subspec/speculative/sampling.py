"""Turning logits into the target's distribution, and drawing from it. Pure tensor functions."""

from __future__ import annotations

import torch

from subspec.config import SamplingConfig


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row ([N, V]); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (nucleus); rows [N, V]."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= p  # mass before this token already >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The processed distribution [N, V] that sampling draws from (temperature > 0)."""
    x = logits.float() / cfg.temperature
    return apply_top_p(apply_top_k(x, cfg.top_k), cfg.top_p).softmax(-1)


def choose(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> int:
    """The target's token for one row of logits ([V]): argmax, or an exact sample."""
    if cfg.greedy:
        return int(logits.argmax())
    probs = target_probs(logits[None], cfg)[0]
    return int(torch.multinomial(probs, 1, generator=gen))

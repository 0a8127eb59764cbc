"""A model placed in memory: its decoder, the source of its layer weights and its KV cache."""

from __future__ import annotations

import torch

from subspec.model.forward import Model
from subspec.model.kv_cache import KVCache
from subspec.model.layers import LayerSource, Linear, Waits


class PlacedModel:
    """`forward` is one pass over all layers, resident or streamed; `logits` applies a head."""

    def __init__(self, model: Model, layers: LayerSource, cache: KVCache):
        self.model, self.layers, self.cache = model, layers, cache
        self.device = model.device

    def forward(self, tokens, positions, slots, mask, kv_len, waits: Waits | None = None):
        """Hidden states [T, H]; see Model.forward for the arguments."""
        return self.model.forward(
            self.layers, self.cache, tokens, positions, slots, mask, kv_len, waits
        )

    def logits(self, hidden: torch.Tensor, lm_head: Linear | None = None,
               waits: Waits | None = None) -> torch.Tensor:  # fmt: skip
        """fp32 logits [T, V] of hidden states [T, H] (the model's own head by default)."""
        return self.model.logits(hidden, lm_head, waits)

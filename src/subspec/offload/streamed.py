"""Target weights that live in the slow tier, read through the prefetcher on every use."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from subspec.model.layers import dense, dense_layer
from subspec.offload.layer_file import tensors_from_buffer
from subspec.offload.prefetch import Prefetcher


class StreamedLayers:
    """Target layers that live in the slow tier: each use waits for its bytes in a buffer."""

    def __init__(self, prefetcher: Prefetcher, manifests: dict):
        self.prefetcher, self.manifests = prefetcher, manifests
        self.bytes_used = 0  # bytes of layers consumed by forward passes

    @contextmanager
    def tensors(self, unit: int):
        """The tensors of one unit (a layer or an LM head chunk), valid inside the block."""
        buf = self.prefetcher.acquire(unit)
        try:
            self.bytes_used += self.manifests[unit].total_bytes
            yield tensors_from_buffer(buf, self.manifests[unit])
        finally:
            self.prefetcher.release(unit)

    @contextmanager
    def layer(self, i: int):
        with self.tensors(i) as t:
            yield dense_layer(t)


class StreamedHead:
    """The target's LM head in the slow tier, read chunk by chunk on every call."""

    def __init__(self, streamer: StreamedLayers, units: list[int]):
        self.streamer, self.units = streamer, units

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, H] -> logits [T, V], the vocabulary in the chunks' order."""
        parts = []
        for unit in self.units:
            with self.streamer.tensors(unit) as t:
                parts.append(dense(t["weight"])(h))  # [T, rows]
        return torch.cat(parts, dim=-1)

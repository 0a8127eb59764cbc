"""Target weights that live in the slow tier, read through the prefetcher on every use."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from subspec.model.layers import dense, dense_layer
from subspec.offload.layer_file import tensors_from_buffer
from subspec.offload.prefetch import Prefetcher


class StreamedLayers:
    """Target layers that live in the slow tier: each use waits for its bytes in a buffer."""

    def __init__(self, prefetcher: Prefetcher, manifests: dict, exact: bool = False):
        self.prefetcher, self.manifests = prefetcher, manifests
        self.exact = exact  # row-invariant linears (see layers.dense)
        self.bytes_used = 0  # bytes of layers consumed by forward passes
        self._idle: Callable[[float], bool] | None = None

    @contextmanager
    def while_waiting(self, work: Callable[[float], bool]):
        """Inside the block, every wait for a unit's bytes runs `work(expected_wait_s)` first,
        one short unit per call, until the bytes arrive or it returns False (it did nothing:
        nothing left to do, or nothing that fits in the wait)."""
        self._idle = work
        try:
            yield
        finally:
            self._idle = None

    @contextmanager
    def tensors(self, unit: int):
        """The tensors of one unit (a layer or an LM head chunk), valid inside the block."""
        buf = self.prefetcher.acquire(unit, self._idle)
        try:
            self.bytes_used += self.manifests[unit].total_bytes
            yield tensors_from_buffer(buf, self.manifests[unit])
        finally:
            self.prefetcher.release(unit)

    @contextmanager
    def layer(self, i: int):
        with self.tensors(i) as t:
            yield dense_layer(t, self.exact)


class StreamedHead:
    """The target's LM head in the slow tier, read chunk by chunk on every call; with exact
    numerics the logits come out of the fp32 accumulators."""

    def __init__(self, streamer: StreamedLayers, units: list[int]):
        self.streamer, self.units = streamer, units
        self.out_dtype = torch.float32 if streamer.exact else None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, H] -> logits [T, V], the vocabulary in the chunks' order."""
        parts = []
        for unit in self.units:
            with self.streamer.tensors(unit) as t:
                linear = dense(t["weight"], exact=self.streamer.exact, out_dtype=self.out_dtype)
                parts.append(linear(h))  # [T, rows]
        return torch.cat(parts, dim=-1)

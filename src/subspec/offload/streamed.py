"""Target weights that live in the slow tier, read through the prefetcher on every use."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from subspec.kernels import residual
from subspec.kernels.exact import exact_residual_linear
from subspec.model.checkpoint import NORMS
from subspec.model.layers import LINEAR_NAMES, LayerWeights, Waits, dense, dense_layer
from subspec.offload.layer_file import tensors_from_buffer
from subspec.offload.prefetch import Prefetcher
from subspec.quant.linear import QuantLinear
from subspec.sizes import rebuilds_in_matmul


class StreamedLayers:
    """Target layers that live in the slow tier: each use waits for its bytes in a buffer."""

    def __init__(self, prefetcher: Prefetcher, manifests: dict, exact: bool = False,
                 rebuild: Rebuild | None = None):  # fmt: skip
        """`rebuild`: the layers stream in residual form (kernels/residual.py)."""
        self.prefetcher, self.manifests = prefetcher, manifests
        self.exact = exact  # row-invariant linears (see layers.dense)
        self.rebuild = rebuild
        self.bytes_used = 0  # bytes of layers consumed by forward passes

    @contextmanager
    def tensors(self, unit: int, waits: Waits | None = None):
        """The tensors of one unit (a layer or an LM head chunk), valid inside the block;
        while its bytes are not there, `waits.work` runs and `waits.waited_s` counts."""
        if waits is None:
            buf = self.prefetcher.acquire(unit)
        else:
            waited = self.prefetcher.stats.wait_s
            buf = self.prefetcher.acquire(unit, waits.work)
            waits.waited_s += self.prefetcher.stats.wait_s - waited
        try:
            self.bytes_used += self.manifests[unit].total_bytes
            yield tensors_from_buffer(buf, self.manifests[unit])
        finally:
            self.prefetcher.release(unit)

    @contextmanager
    def layer(self, i: int, waits: Waits | None = None):
        with self.tensors(i, waits) as t:
            if self.rebuild:
                yield self.rebuild.layer(i, t, self.exact)
            else:
                yield dense_layer(t, self.exact)


class Rebuild:
    """Layers streamed in residual form: each weight is rebuilt from its part of the staging
    buffer and the layer's resident substitute. With exact numerics, where the fused kernel
    runs (sizes.rebuilds_in_matmul), block by block inside the matmul; else whole, into one
    reused buffer, just before its matmul (a layer's linears run one after the other)."""

    def __init__(self, substitutes: dict[int, LayerWeights], largest: int, exact: bool):
        """`substitutes`: {layer: its substitute}; `largest`: the most weights of one linear."""
        self.substitutes = substitutes
        self.in_linear = rebuilds_in_matmul(exact)
        # [largest], reused: only where weights are rebuilt whole
        self.buffer = None if self.in_linear else torch.empty(largest, dtype=torch.bfloat16)

    def layer(self, i: int, t: dict[str, torch.Tensor], exact: bool) -> LayerWeights:
        """LayerWeights over the tensors `t` of layer i in residual form (see weights.py)."""
        linears = {name: self._linear(t, name, getattr(self.substitutes[i], name), exact)
                   for name in LINEAR_NAMES}  # fmt: skip
        return LayerWeights(**linears, **{name: t.get(name) for name in NORMS})

    def _linear(self, t, name: str, substitute: QuantLinear, exact: bool):
        parts = {part: t[f"{name}.{part}"] for part in residual.PARTS}
        bias = t.get(f"{name}.bias")

        if self.in_linear:
            return lambda x: exact_residual_linear(x, parts, substitute, bias)

        def linear(x: torch.Tensor) -> torch.Tensor:
            weight = residual.decode(parts, substitute, self.buffer)  # [out, in] bf16
            return dense(weight, bias, exact=exact)(x)

        return linear


class StreamedHead:
    """The target's LM head in the slow tier, read chunk by chunk on every call; with exact
    numerics the logits come out of the fp32 accumulators."""

    def __init__(self, streamer: StreamedLayers, units: list[int]):
        self.streamer, self.units = streamer, units
        self.out_dtype = torch.float32 if streamer.exact else None

    streams = True  # Model.logits hands it the pass's Waits

    def __call__(self, h: torch.Tensor, waits: Waits | None = None) -> torch.Tensor:
        """h [T, H] -> logits [T, V], the vocabulary in the chunks' order (`waits`: see
        StreamedLayers.tensors)."""
        parts = []
        for unit in self.units:
            with self.streamer.tensors(unit, waits) as t:
                linear = dense(t["weight"], exact=self.streamer.exact, out_dtype=self.out_dtype)
                parts.append(linear(h))  # [T, rows]
        return torch.cat(parts, dim=-1)

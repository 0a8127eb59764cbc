"""Decoder-layer weights and the sources that supply them to a forward pass.

A layer's weights are plain tensors in one dict (see LAYER_TENSORS); its linear maps are
callables so that a dense bf16 weight, a streamed weight and a low-bit substitute look alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor], torch.Tensor]


def dense(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    """A linear map over a full-precision weight [out, in]."""
    return lambda x: F.linear(x, weight, bias)


@dataclass
class LayerWeights:
    """One decoder layer. q, k, v are fused into `qkv` and gate, up into `gate_up`."""

    attn_norm: torch.Tensor  # [H]
    mlp_norm: torch.Tensor  # [H]
    qkv: Linear  # [T, H] -> [T, (Hq + 2 Hkv) D]
    o: Linear  # [T, Hq D] -> [T, H]
    gate_up: Linear  # [T, H] -> [T, 2 F]
    down: Linear  # [T, F] -> [T, H]
    q_norm: torch.Tensor | None = None  # [D], Qwen3
    k_norm: torch.Tensor | None = None  # [D], Qwen3


# Names of the tensors of one layer in subspec's fused layout ('.bias' and norms optional).
LINEAR_NAMES = ("qkv", "o", "gate_up", "down")


def dense_layer(t: dict[str, torch.Tensor]) -> LayerWeights:
    """LayerWeights over full-precision tensors in the fused layout."""
    return LayerWeights(
        attn_norm=t["attn_norm"],
        mlp_norm=t["mlp_norm"],
        qkv=dense(t["qkv.weight"], t.get("qkv.bias")),
        o=dense(t["o.weight"]),
        gate_up=dense(t["gate_up.weight"]),
        down=dense(t["down.weight"]),
        q_norm=t.get("q_norm"),
        k_norm=t.get("k_norm"),
    )


def substitute_layer(t: dict[str, torch.Tensor], linears: dict[str, Linear]) -> LayerWeights:
    """LayerWeights whose linear maps are low-bit substitutes; norms stay full precision."""
    return LayerWeights(
        attn_norm=t["attn_norm"],
        mlp_norm=t["mlp_norm"],
        qkv=linears["qkv"],
        o=linears["o"],
        gate_up=linears["gate_up"],
        down=linears["down"],
        q_norm=t.get("q_norm"),
        k_norm=t.get("k_norm"),
    )


class LayerSource:
    """Supplies each layer's weights in order, once per forward pass.

    Iterating yields (index, LayerWeights). A streamed layer's buffer is handed back when
    the consumer asks for the next layer, so the offloader can refill it.
    """

    def __init__(self, resident: dict[int, LayerWeights], num_layers: int, streamer=None):
        self.resident = resident
        self.num_layers = num_layers
        self.streamer = streamer  # StreamedLayers or None when everything is resident

    def __iter__(self) -> Iterator[tuple[int, LayerWeights]]:
        for i in range(self.num_layers):
            if i in self.resident:
                yield i, self.resident[i]
            else:
                with self.streamer.layer(i) as weights:
                    yield i, weights

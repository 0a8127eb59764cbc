"""Decoder-layer weights and the sources that supply them to a forward pass.

A layer's weights are plain tensors in one dict (see LAYER_TENSORS); its linear maps are
callables so that a dense bf16 weight, a streamed weight and a low-bit substitute look alike.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from subspec.kernels.draft_layer import FusedDraftLayer
from subspec.kernels.exact import exact_linear
from subspec.sizes import WIDEN_SCRATCH_ELEMENTS, widens

Linear = Callable[[torch.Tensor], torch.Tensor]


def dense(
    weight: torch.Tensor, bias: torch.Tensor | None = None, *, exact: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Linear:  # fmt: skip
    """A linear map over a full-precision weight [out, in].

    `exact`: through the row-invariant kernel (kernels/exact.py), so each row's output is the
    same bits whatever the number of rows in the call; `out_dtype` (exact only): the output's
    dtype, e.g. fp32 logits straight from the fp32 accumulators."""
    if exact:
        return lambda x: exact_linear(x, weight, bias, out_dtype)
    if not widens(weight.dtype, weight.device):
        return lambda x: F.linear(x, weight, bias)

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < WIDEN_MIN_ROWS:
            return F.linear(x, weight, bias)
        return widened_linear(x, weight, bias)

    return linear


# CPUs without native bf16 GEMM (no AVX512_BF16/AMX) emulate it: measured on such a dev VM,
# a bf16 matmul of 33 rows by a decoder layer's weights takes ~65 ms, widening the weights to
# fp32 chunk by chunk and multiplying in fp32 ~50 ms (65 rows: ~105 vs ~56 ms); below ~24 rows
# bf16 wins (the matmul is then bound by reading the weights). With AVX512_BF16/AMX, oneDNN's
# bf16 GEMM wins at every size (33 rows by 17920 x 1536: 11 ms bf16, 49 ms widened).
WIDEN_MIN_ROWS = 24
_scratch = threading.local()


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """F.linear(x, weight, bias) for a bf16 weight [out, in] and many rows x [T, in], computed
    in fp32 (bf16 products are exact in fp32; sums are in fp32, as in a bf16 GEMM) through one
    reused per-thread fp32 buffer, then rounded to x's dtype."""
    size = min(WIDEN_SCRATCH_ELEMENTS, weight.numel())
    scratch = getattr(_scratch, "buffer", None)
    if scratch is None or scratch.numel() < size:
        scratch = _scratch.buffer = torch.empty(size, dtype=torch.float32)
    n_out, n_in = weight.shape
    rows = max(1, scratch.numel() // n_in)  # weight rows widened at a time
    x32 = x.float()  # [T, in]
    out = torch.empty(x.shape[0], n_out, dtype=torch.float32)  # [T, out]
    for a in range(0, n_out, rows):
        chunk = weight[a : a + rows]
        wide = scratch[: chunk.numel()].view_as(chunk)
        wide.copy_(chunk)
        torch.mm(x32, wide.t(), out=out[:, a : a + rows])
    if bias is not None:
        out += bias
    return out.to(x.dtype)


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
    # the whole layer in one native call (substitutes only; see kernels/draft_layer.py)
    fused: FusedDraftLayer | None = None


# Names of the tensors of one layer in subspec's fused layout ('.bias' and norms optional).
LINEAR_NAMES = ("qkv", "o", "gate_up", "down")


def dense_layer(t: dict[str, torch.Tensor], exact: bool = False) -> LayerWeights:
    """LayerWeights over full-precision tensors in the fused layout (`exact`: see dense)."""
    return LayerWeights(
        attn_norm=t["attn_norm"],
        mlp_norm=t["mlp_norm"],
        qkv=dense(t["qkv.weight"], t.get("qkv.bias"), exact=exact),
        o=dense(t["o.weight"], exact=exact),
        gate_up=dense(t["gate_up.weight"], exact=exact),
        down=dense(t["down.weight"], exact=exact),
        q_norm=t.get("q_norm"),
        k_norm=t.get("k_norm"),
    )


def substitute_layer(t: dict[str, torch.Tensor], linears: dict[str, Linear]) -> LayerWeights:
    """LayerWeights whose linear maps are low-bit substitutes; norms stay full precision.
    Where the native kernel takes them, the layer also runs fused (`LayerWeights.fused`)."""
    norms = {name: t.get(name) for name in ("attn_norm", "mlp_norm", "q_norm", "k_norm")}
    fused = FusedDraftLayer(linears, norms) if FusedDraftLayer.fits(linears, norms) else None
    return LayerWeights(
        qkv=linears["qkv"], o=linears["o"], gate_up=linears["gate_up"], down=linears["down"],
        **norms, fused=fused,
    )  # fmt: skip


@dataclass
class Waits:
    """What a forward pass does while it waits for streamed weights, and how long it waited.
    A pass is given one explicitly (Model.forward, Model.logits); without one it just waits."""

    # other work run while a unit's bytes are not there yet, a short part per call, told how
    # long the bytes are expected to take; False: it did nothing (see Prefetcher.acquire)
    work: Callable[[float], bool] | None = None
    waited_s: float = 0.0  # seconds the pass blocked on weights, `work` excluded


class LayerSource:
    """Supplies each layer's weights in order, once per forward pass (`each`).

    A streamed layer's buffer is handed back when the consumer asks for the next layer, so
    the offloader can refill it.
    """

    def __init__(self, resident: dict[int, LayerWeights], num_layers: int, streamer=None):
        self.resident = resident
        self.num_layers = num_layers
        self.streamer = streamer  # StreamedLayers or None when everything is resident

    @property
    def streams(self) -> bool:
        return self.streamer is not None

    def each(self, waits: Waits | None = None) -> Iterator[tuple[int, LayerWeights]]:
        """(index, LayerWeights) of every layer in order; `waits`: see Waits."""
        for i in range(self.num_layers):
            if i in self.resident:
                yield i, self.resident[i]
            else:
                with self.streamer.layer(i, waits) as weights:
                    yield i, weights

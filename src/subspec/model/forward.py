"""The Llama-family decoder forward pass (Llama, Mistral, Qwen2/2.5, Qwen3) in plain PyTorch.

The forward takes everything explicitly: token ids, RoPE positions, the cache slots to write,
an attention mask over the cache, and the source of layer weights. Tree verification and
tree drafting are ordinary calls with a tree mask.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch
import torch.nn.functional as F

from subspec.kernels.exact import exact_attention
from subspec.model.config import ModelConfig
from subspec.model.kv_cache import KVCache
from subspec.model.layers import LayerSource, LayerWeights, Linear, Waits


def finish(parts: Generator):
    """Run a generator of parts (see Model.forward_parts) to its end; returns its value."""
    while True:
        try:
            next(parts)
        except StopIteration as done:
            return done.value


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, as the reference implementation does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(cfg: ModelConfig, max_positions: int, dtype, device):
    """cos, sin tables [max_positions, D] for rotate-half RoPE."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, T, D]; cos, sin: [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Embedding:
    """Token embeddings, either resident or read row by row from the checkpoint's file."""

    def __init__(self, weight: torch.Tensor | None = None, mapped=None, dtype=None, device=None):
        self.weight = weight  # [V, H] resident, or None
        self.mapped = mapped  # (np.memmap [V, H], stored torch dtype) or None
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        self._staging: torch.Tensor | None = None  # CUDA: pinned [rows, H] gather buffer
        self._copied = None  # CUDA event: the last copy out of the staging buffer

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return self.weight[tokens]
        rows, stored = self.mapped
        ids = tokens.cpu().numpy()  # the forward's one host sync when tokens are on a GPU
        if self.device.type == "cuda":
            picked = self._staged(rows, ids, stored)
        else:
            picked = torch.from_numpy(np.ascontiguousarray(rows[ids]))
        if stored == torch.bfloat16:
            picked = picked.view(torch.bfloat16)
        return picked.to(dtype=self.dtype, device=self.device)  # [T, H]

    def _staged(self, rows: np.memmap, ids: np.ndarray, stored: torch.dtype) -> torch.Tensor:
        """Gather rows into a pinned staging buffer (allocated once, grown if a call needs
        more rows) and copy them to the device without blocking: [T, H] on the device."""
        t = len(ids)
        if self._staging is None or self._staging.shape[0] < t:
            raw = torch.int16 if stored == torch.bfloat16 else stored  # bf16 rows: their bits
            self._staging = torch.empty((max(t, 512), rows.shape[1]), dtype=raw, pin_memory=True)
            self._copied = torch.cuda.Event()
        self._copied.synchronize()  # the previous copy out of the buffer has finished
        staged = self._staging[:t]
        np.take(rows, ids, axis=0, out=staged.numpy().view(rows.dtype))
        on_device = staged.to(self.device, non_blocking=True)
        self._copied.record()
        return on_device


class Model:
    """Embedding, final norm and LM head of a decoder; the layers come from a LayerSource."""

    def __init__(
        self, cfg, embed, final_norm, lm_head: Linear, dtype, device, max_positions,
        exact: bool = False,
    ):  # fmt: skip
        """`exact`: tree-invariant attention (kernels/exact.py); the linears' numerics are
        their own (layers.dense)."""
        self.cfg = cfg
        self.attention = exact_attention if exact else attention
        self.embed = embed
        self.final_norm = final_norm  # [H]
        self.lm_head = lm_head
        self.dtype, self.device = dtype, device
        self.cos, self.sin = rope_tables(cfg, max_positions, dtype, device)

    def forward(
        self,
        layers: LayerSource,
        cache: KVCache,
        tokens: torch.Tensor,  # [T] token ids
        positions: torch.Tensor,  # [T] RoPE positions
        slots: torch.Tensor,  # [T] cache slots to write
        mask: torch.Tensor | None,  # [T, kv_len] bool, True = attend; None = attend to all
        kv_len: int,
        waits: Waits | None = None,  # what to do while streamed weights are not there yet
    ) -> torch.Tensor:
        """Run the decoder; returns final hidden states [T, H] (before the final norm)."""
        parts = self.forward_parts(layers, cache, tokens, positions, slots, mask, kv_len, waits)
        return finish(parts)

    def forward_parts(
        self, layers: LayerSource, cache: KVCache, tokens, positions, slots, mask, kv_len,
        waits: Waits | None = None,
    ) -> Generator[None, None, torch.Tensor]:  # fmt: skip
        """forward() one decoder layer per next(): yields after each, returns the hidden
        states, so that it can be run in another computation's waits (speculative/lookahead.py)."""
        x = self.embed(tokens)  # [T, H]
        cos, sin = self.cos[positions], self.sin[positions]  # [T, D]
        attn_mask = fused_kernel_mask(mask, x.dtype)  # once per forward, not per layer
        for i, w in layers.each(waits):
            x = self._layer(i, w, x, cos, sin, cache, slots, attn_mask, kv_len)
            yield
        return x

    def logits(self, hidden: torch.Tensor, lm_head: Linear | None = None,
               waits: Waits | None = None) -> torch.Tensor:  # fmt: skip
        """fp32 logits [T, V] from hidden states [T, H]; `waits`: see forward (a streamed
        head, offload/streamed.py, waits for its chunks)."""
        h = rms_norm(hidden, self.final_norm, self.cfg.rms_norm_eps)
        head = self.lm_head if lm_head is None else lm_head
        if waits is not None and getattr(head, "streams", False):
            return head(h, waits).float()
        return head(h).float()

    def _layer(self, i, w: LayerWeights, x, cos, sin, cache, slots, attn_mask, kv_len):
        cfg = self.cfg
        if w.fused is not None and x.dtype == cache.k.dtype == cos.dtype == torch.bfloat16:
            return w.fused(cfg, x, cos, sin, cache, i, slots, attn_mask, kv_len)
        t, hq, hkv, d = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = w.qkv(rms_norm(x, w.attn_norm, cfg.rms_norm_eps))  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.view(t, hq + 2 * hkv, d).transpose(0, 1).split([hq, hkv, hkv])
        if w.q_norm is not None:
            q = rms_norm(q, w.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, w.k_norm, cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [Hq|Hkv, T, D]
        cache.write(i, slots, k, v)
        keys, values = cache.view(i, kv_len)  # [Hkv, kv_len, D]
        attn = self.attention(q, keys, values, attn_mask)  # [Hq, T, D]
        x = x + w.o(attn.transpose(0, 1).reshape(t, hq * d))
        gate, up = w.gate_up(rms_norm(x, w.mlp_norm, cfg.rms_norm_eps)).chunk(2, dim=-1)
        return x + w.down(F.silu(gate) * up)


SMALL_QUERY = 64  # up to this many queries, explicit grouped attention beats SDPA on CPU


def attention(q, keys, values, mask) -> torch.Tensor:
    """Grouped-query attention. q: [Hq, T, D]; keys, values: [Hkv, S, D]; mask: [T, S] bool
    (True = attend) or None. Returns [Hq, T, D].

    Small T (decode steps, draft levels, trees) use explicit matmuls over the query groups,
    measured 2-3x faster than SDPA's masked GQA path here; long prefill chunks use SDPA."""
    hq, t, d = q.shape
    hkv = keys.shape[0]
    if t > SMALL_QUERY and q.device.type == "cuda":
        return fused_attention(q, keys, values, mask)
    if t > SMALL_QUERY:
        return F.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=mask, enable_gqa=hq != hkv
        )[0]
    # On CPU these small bmms run in fp32, even where bf16 GEMMs are native: without native
    # bf16 they were 2.5-3x slower in bf16; with it (oneDNN, AMX) every new cache length sets
    # up a new bf16 kernel, ~2.8 ms against ~0.3 ms in fp32 for 2 queries over ~400 tokens.
    wide = torch.float32 if q.device.type == "cpu" else q.dtype
    grouped = q.reshape(hkv, (hq // hkv) * t, d).to(wide)  # [Hkv, G T, D], a group adjacent
    scores = (grouped @ keys.to(wide).transpose(1, 2)) * d**-0.5  # [Hkv, G T, S]
    if mask is not None:
        scores = scores.view(hkv, hq // hkv, t, -1).masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(-1).to(wide).view(hkv, (hq // hkv) * t, -1)
    return (probs @ values.to(wide)).view(hq, t, d).to(q.dtype)


def fused_kernel_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask in the form `attention` takes: bool, except for more than SMALL_QUERY queries
    on CUDA, where it is additive (0 or -inf, in `dtype`): SDPA's fused kernels take that,
    while a bool mask with grouped heads sends them to the math kernel."""
    if mask is None or mask.shape[0] <= SMALL_QUERY or mask.device.type != "cuda":
        return mask
    return additive_mask(mask, dtype)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, S] bool (True = attend) -> [T, S] 0 / -inf in `dtype`."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def fused_attention(q, keys, values, mask) -> torch.Tensor:
    """SDPA on inputs its fused (memory-efficient, cuDNN) kernels take: K/V repeated per query
    head instead of enable_gqa, and an additive mask ([T, S] float; a bool one is converted).
    q: [Hq, T, D]; keys, values: [Hkv, S, D]. Returns [Hq, T, D]."""
    group = q.shape[0] // keys.shape[0]
    if group > 1:
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    if mask is not None and mask.dtype == torch.bool:
        mask = additive_mask(mask, q.dtype)
    return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask)[0]


def causal_mask(start: int, t: int, device) -> torch.Tensor:
    """[t, start + t] bool mask for t new tokens after `start` committed ones."""
    q = torch.arange(start, start + t, device=device)[:, None]
    return torch.arange(start + t, device=device)[None, :] <= q

"""A substitute decoder layer in one native call (csrc/int4_vnni.c, `subspec_draft_layer`).

A draft step runs every substitute layer for a few rows; through torch, each layer is ~45
small ops (norms, RoPE, cache writes, attention, casts) of a few microseconds each, as much
time as the layer's int4 matmuls. The fused layer does the same arithmetic in fp32 inside one
call. It takes bf16 activations and a bf16 cache on CPU, with all four linears in the
``int4_vnni`` layout; anything else runs the torch path (model/forward.py).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from subspec.kernels import native

_VOID, _I64 = ctypes.c_void_p, ctypes.c_int64
LINEARS = ("qkv", "o", "gate_up", "down")


class _Int4Linear(ctypes.Structure):
    _fields_ = [("w", _VOID), ("bias", _VOID), ("n", _I64), ("k", _I64)]


class _DraftLayer(ctypes.Structure):
    _fields_ = [
        *((name, _Int4Linear) for name in LINEARS),
        *((name, _VOID) for name in ("attn_norm", "mlp_norm", "q_norm", "k_norm")),
        *((name, _I64) for name in ("hidden", "heads", "kv_heads", "head_dim", "group")),
        ("eps", ctypes.c_float),
    ]


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = native.int4_vnni()
    if lib is None:
        return None
    lib.subspec_draft_layer.restype = ctypes.c_int
    lib.subspec_draft_layer.argtypes = [_VOID] * 7 + [_I64, _VOID, _VOID, _I64, ctypes.c_int]
    return lib


def _linear(m) -> _Int4Linear:
    """The kernel's view of a QuantLinear in the int4_vnni layout."""
    return _Int4Linear(native.ptr(m.qdata), native.ptr(m.bias), m.out_features, m.in_features)


class FusedDraftLayer:
    """Callable as ``(cfg, x, cos, sin, cache, layer, slots, mask, kv_len) -> x`` for a layer
    of low-bit substitutes; see `fits` for when it applies."""

    def __init__(self, linears: dict, norms: dict[str, torch.Tensor | None]):
        self.linears = linears  # name -> QuantLinear (int4_vnni)
        self.norms = norms  # attn_norm, mlp_norm, q_norm, k_norm: [H] / [D] bf16 or None
        self._struct = _DraftLayer()
        self._packed: tuple = (None,) * len(LINEARS)  # the qdata tensors the struct points into

    @staticmethod
    def fits(linears: dict, norms: dict[str, torch.Tensor | None]) -> bool:
        """Whether the fused kernel takes this layer: all linears int4_vnni with one group
        size, bf16 CPU norms, and the kernel library loaded."""
        layouts = {getattr(linears[n], "layout", None) for n in LINEARS}
        if _lib() is None or layouts != {"int4_vnni"}:
            return False
        groups = {linears[n].group_size for n in LINEARS}
        tensors = [t for t in norms.values() if t is not None]
        return len(groups) == 1 and all(
            t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()
            for t in tensors
        )

    def __call__(self, cfg, x, cos, sin, cache, layer, slots, mask, kv_len) -> torch.Tensor:
        """The layer's output [T, H] bf16 for x [T, H] bf16 (cos, sin [T, D] bf16; slots [T];
        mask [T, kv_len] bool or None); writes the T keys and values into `cache`. Shapes and
        slots are checked here and again by the kernel (ValueError, RuntimeError)."""
        t = x.shape[0]
        out = x.contiguous().clone()  # [T, H], replaced in place by the kernel
        # every tensor whose address the kernel gets is bound here, alive through the call
        cos, sin = cos.contiguous(), sin.contiguous()  # [T, D] each
        slots = slots.to(torch.int64).contiguous()  # [T]
        mask = None if mask is None else mask.contiguous()  # [T, kv_len]
        _check(cfg, out, cos, sin, slots, mask, kv_len, cache.capacity)
        k_cache, v_cache = cache.k[layer], cache.v[layer]  # [Hkv, S, D] each
        rc = _lib().subspec_draft_layer(
            ctypes.byref(self._layer(cfg)), out.data_ptr(), t, cos.data_ptr(), sin.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), cache.capacity, slots.data_ptr(),
            None if mask is None else mask.data_ptr(), kv_len, torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"fused draft layer failed ({rc}) for x {tuple(x.shape)}")
        return out

    def _layer(self, cfg) -> _DraftLayer:
        """The kernel's view of the weights, rebuilt if a linear was repacked since."""
        packed = tuple(self.linears[n].qdata for n in LINEARS)
        if any(a is not b for a, b in zip(packed, self._packed, strict=True)):
            lin = {n: _linear(self.linears[n]) for n in LINEARS}
            norms = {n: native.ptr(t) for n, t in self.norms.items()}
            self._struct = _DraftLayer(
                **lin, **norms, hidden=cfg.hidden_size, heads=cfg.num_heads,
                kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                group=self.linears["qkv"].group_size, eps=cfg.rms_norm_eps,
            )  # fmt: skip
            self._packed = packed
        return self._struct


def _check(cfg, x, cos, sin, slots, mask, kv_len: int, capacity: int) -> None:
    """Refuse what the kernel would read or write out of bounds."""
    t, d = x.shape[0], cfg.head_dim
    if x.shape != (t, cfg.hidden_size) or cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)} "
                         f"do not fit hidden {cfg.hidden_size}, head_dim {d}")  # fmt: skip
    bad_mask = mask is not None and (mask.shape != (t, kv_len) or mask.dtype != torch.bool)
    if slots.shape != (t,) or bad_mask:
        raise ValueError(f"slots {tuple(slots.shape)} or mask do not fit {t} rows x {kv_len}")
    inside = t == 0 or 0 <= int(slots.min()) and int(slots.max()) < capacity
    if not (0 < kv_len <= capacity and inside):
        raise ValueError(f"slots or kv_len {kv_len} outside the cache's {capacity} slots")

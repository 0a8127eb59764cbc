"""Row-invariant linear and attention, for bit-exact bf16 speculative decoding.

torch's CPU GEMM rounds differently for different row counts: `(a @ W.T)[:1]` and
`a[:1] @ W.T` differ in bf16. A tree verification multiplies 33-289 rows where vanilla decoding
multiplies one, so at near-ties the two could pick different tokens. Here every output row is a
function of its own input row alone, bit for bit, for any number of rows, any position of the
row among them, and any thread count:

- `exact_linear`: fp32 accumulation in an order fixed by K alone (no split-K), bias added in
  fp32, one rounding to the output dtype (csrc/bf16_exact.c describes the arithmetic).
- `exact_attention`: each query reduces over exactly the keys it attends to, in key order, so
  a tree node gets what the same token gets in sequential decoding over the same keys.

Both run the C kernel of native.bf16_exact() on CPU. Without it (no x86-64 C compiler,
SUBSPEC_NATIVE=0, another device) they compute each row alone through fixed-shape torch ops:
still row-invariant, but slow (the weight is streamed once per row).

rms_norm, apply_rope, residual adds and softmax/log_softmax over rows are already row-invariant
in torch on CPU; tests/test_exact.py checks it.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from subspec.kernels import native, residual

_VOID, _I64, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
TORCH_CHUNK = 4096  # rows of W the torch fallback converts to fp32 at a time


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The kernel library with its signatures declared, or None."""
    lib = native.bf16_exact()
    if lib is None:
        return None
    lib.subspec_exact_linear.restype = _INT
    lib.subspec_exact_linear.argtypes = [_VOID] * 4 + [_I64] * 3 + [_INT] * 4
    lib.subspec_exact_fma_supported.restype = _INT
    lib.subspec_exact_amx_supported.restype = _INT
    lib.subspec_residual_exact_linear.restype = _INT
    lib.subspec_residual_exact_linear.argtypes = (
        [_VOID] * 3 + [_I64] + [_VOID] * 4 + [_I64] * 4 + [_INT] * 4
    )
    lib.subspec_exact_attention.restype = _INT
    lib.subspec_exact_attention.argtypes = [_VOID] * 5 + [_I64] * 5 + [_FLOAT, _INT, _INT]
    return lib


# The kernel's arithmetic paths (csrc/bf16_exact.c): each is row-invariant on its own.
PORTABLE, DPBF16, FMA, AMX = 0, 1, 2, 3


@functools.cache
def has_dpbf16() -> bool:
    """True when the kernel runs its AVX512_BF16 (vdpbf16ps) path here."""
    lib = _lib()
    return lib is not None and bool(lib.subspec_exact_dpbf16_supported())


@functools.cache
def has_fma() -> bool:
    """True when the kernel runs its AVX2 + FMA path here (for fp32 x)."""
    lib = _lib()
    return lib is not None and bool(lib.subspec_exact_fma_supported())


@functools.cache
def has_amx() -> bool:
    """True when the kernel runs its AMX-BF16 tile path here (the CPU has it and Linux granted
    this process the tile registers)."""
    lib = _lib()
    return lib is not None and bool(lib.subspec_exact_amx_supported())


def kernel_path(x_dtype: torch.dtype, w_dtype: torch.dtype) -> int:
    """The arithmetic path for these dtypes on this CPU: the CPU decides, never the shape."""
    if x_dtype == w_dtype == torch.bfloat16:
        if has_amx():
            return AMX
        if has_dpbf16():
            return DPBF16
    return FMA if has_fma() else PORTABLE


def exact_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [..., in] bf16 or fp32 @ weight [out, in].T + bias [out] -> [..., out] in `out_dtype`
    (default x.dtype; torch.float32 for logits). Each row's result is bit-identical whatever the
    other rows. bf16 x with a bf16 weight runs AMX tiles, else vdpbf16ps, where the CPU has
    them; everything else runs in fp32: fused multiply-adds where the CPU has AVX2 and FMA,
    else the portable path (see kernel_path)."""
    out_dtype = out_dtype or x.dtype
    rows = x.reshape(-1, x.shape[-1])  # [T, in]
    native_ok = x.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float32)
    if native_ok and _lib() is not None:
        y = _native_linear(rows, weight, bias, out_dtype, kernel_path(x.dtype, weight.dtype))
    else:
        y = _torch_linear(rows, weight, bias).to(out_dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def exact_residual_linear(x: torch.Tensor, parts: dict[str, torch.Tensor], sub, bias=None):
    """exact_linear(x, W, bias) for x [..., in] bf16 and a weight W [out, in] bf16 held in
    residual form (`parts`, against the 4-bit substitute `sub`: kernels/residual.py), rebuilt
    block by block inside the kernel (csrc/residual_linear.c): bit for bit exact_linear over
    residual.decode's W, without W whole in memory (where sizes.rebuilds_in_matmul)."""
    if _lib() is None:
        raise RuntimeError(f"the exact kernel did not build: {native.build_error('bf16_exact')}")
    n, k = sub.out_features, sub.in_features
    resid, escapes, tiles = residual.checked_parts(parts, n, k)
    path = kernel_path(torch.bfloat16, torch.bfloat16)  # dpbf16 takes x bf16, the others fp32
    rows = x.reshape(-1, k).to(torch.bfloat16 if path == DPBF16 else torch.float32)
    rows = rows.contiguous()  # [T, in]
    y = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)  # [T, out]
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    rc = _lib().subspec_residual_exact_linear(
        sub.qdata.data_ptr(), resid.data_ptr(), escapes.data_ptr(), escapes.numel(),
        tiles.data_ptr(), rows.data_ptr(), native.ptr(bias), y.data_ptr(), rows.shape[0], n, k,
        sub.group_size, 1, path, 1, torch.get_num_threads(),
    )  # fmt: skip
    residual.raise_for(rc, n, k)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def _native_linear(
    x: torch.Tensor, weight: torch.Tensor, bias, out_dtype: torch.dtype, path: int
) -> torch.Tensor:
    """[T, in] -> [T, out] through the C kernel on `path` (DPBF16 and AMX: x, weight bf16;
    else x runs in fp32)."""
    t, k = x.shape
    n = weight.shape[0]
    x = x.to(torch.bfloat16 if path in (DPBF16, AMX) else torch.float32).contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    y_bf16 = out_dtype == torch.bfloat16
    y = torch.empty(t, n, dtype=torch.bfloat16 if y_bf16 else torch.float32)  # [T, out]
    rc = _lib().subspec_exact_linear(
        x.data_ptr(), weight.data_ptr(), native.ptr(bias), y.data_ptr(), t, n, k,
        int(weight.dtype == torch.bfloat16), int(y_bf16), path, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"exact_linear kernel failed ({rc}): x {tuple(x.shape)}, W [{n}, {k}]")
    return y.to(out_dtype)


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """[T, in] -> [T, out] fp32, each row alone: one fp32 matrix-vector product per row and
    chunk of TORCH_CHUNK rows of W, shapes that depend on W alone, on a fresh (aligned) copy of
    the row. Slow: W is streamed once per row."""
    t, n = x.shape[0], weight.shape[0]
    y = torch.empty(t, n, dtype=torch.float32, device=x.device)  # [T, out]
    for n0 in range(0, n, TORCH_CHUNK):
        w = weight[n0 : n0 + TORCH_CHUNK].float()  # [chunk, in]
        for i in range(t):
            y[i, n0 : n0 + TORCH_CHUNK] = torch.mv(w, x[i].float().clone())
    return y if bias is None else y + bias.float()


def exact_attention(q, keys, values, mask) -> torch.Tensor:
    """Grouped-query attention with the signature of model.attention: q [Hq, T, D]; keys,
    values [Hkv, S, D]; mask [T, S] bool (True = attend) or None. Returns [Hq, T, D] in q's
    dtype, accumulated in fp32. Row t of the result is bit-identical to a one-query call of
    q[:, t:t+1] over only the keys mask[t] keeps, stored contiguously in the same order."""
    hq, t, d = q.shape
    hkv, s, _ = keys.shape
    if q.device.type != "cpu" or _lib() is None:
        return _torch_attention(q, keys, values, mask)
    kv_dtype = torch.bfloat16 if keys.dtype == values.dtype == torch.bfloat16 else torch.float32
    k = keys.to(kv_dtype).contiguous()  # [Hkv, S, D]
    v = values.to(kv_dtype).contiguous()
    qf = q.float().contiguous()  # [Hq, T, D]
    m = None if mask is None else mask.to(torch.bool).contiguous()  # [T, S], one byte each
    out = torch.empty(hq, t, d, dtype=torch.float32)  # [Hq, T, D]
    rc = _lib().subspec_exact_attention(
        qf.data_ptr(), k.data_ptr(), v.data_ptr(), native.ptr(m), out.data_ptr(), hq, hkv, t, s, d,
        d**-0.5, int(kv_dtype == torch.bfloat16), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"exact_attention kernel failed ({rc}): q {tuple(q.shape)}, S {s}")
    return out.to(q.dtype)


def _torch_attention(q, keys, values, mask) -> torch.Tensor:
    """exact_attention without the kernel: each query alone over its gathered keys, through
    the same ops a one-query call over those keys runs (shapes set by the kept count alone)."""
    hq, t, d = q.shape
    hkv = keys.shape[0]
    out = torch.empty(hq, t, d, dtype=q.dtype, device=q.device)  # [Hq, T, D]
    for i in range(t):
        k, v = keys, values
        if mask is not None:
            kept = mask[i].nonzero().squeeze(1)  # [S']
            k, v = keys[:, kept].contiguous(), values[:, kept].contiguous()  # [Hkv, S', D]
        qi = q[:, i].reshape(hkv, hq // hkv, d).float()  # [Hkv, G, D]
        probs = ((qi @ k.float().transpose(1, 2)) * d**-0.5).softmax(-1)  # [Hkv, G, S']
        out[:, i] = (probs @ v.float()).reshape(hq, d).to(q.dtype)
    return out

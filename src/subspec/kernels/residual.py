"""A streamed bf16 weight held as what its resident 4-bit substitute lacks (csrc/residual.c).

SubSpec keeps a 4-bit substitute of every streamed layer in fast memory; the slow tier then
holds, per weight, the byte difference between the weight's bf16 bits and the substitute's
value, escaping to the full bits where a byte does not hold it. Rebuilding is exact, bit for
bit, so the target computes on its own weights; the stream shrinks from 2 bytes a weight to
about 1.14 (the 1.5B Qwen2.5 at 4 bits, group 64: 7% escapes).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from subspec.kernels import native
from subspec.quant.linear import QuantLinear
from subspec.sizes import RESIDUAL_SAMPLE_STRIDE

_VOID, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
PARTS = ("residual", "escapes", "tile_escapes", "substitute_sample")  # encode()'s tensors


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = native.residual()
    if lib is None:
        return None
    lib.subspec_residual_encode.restype = _I64
    lib.subspec_residual_encode.argtypes = [_VOID] * 5 + [_I64] * 3
    lib.subspec_residual_decode.restype = _INT
    lib.subspec_residual_decode.argtypes = (
        [_VOID] * 3 + [_I64] + [_VOID] * 2 + [_I64] * 3 + [_INT] * 2
    )
    lib.subspec_residual_simd.restype = _INT
    return lib


def has_simd() -> bool:
    """Whether the codec builds and runs its AVX-512 path here."""
    lib = _lib()
    return lib is not None and bool(lib.subspec_residual_simd())


def available() -> bool:
    """Whether residual streaming pays here: the codec builds and the CPU runs its AVX-512
    path, and the int4 tile layout builds. (The scalar path, the reference the tests check
    the AVX-512 one against, rebuilt a layer of the 1.5B in 37 ms on two Zen 4 cores, 6-8 ms
    with AVX-512: more than the 15 ms its 41 MB smaller read saves at 2.7 GB/s.)"""
    return has_simd() and native.int4_vnni() is not None


def fits(sub: QuantLinear) -> bool:
    """Whether `sub` is in the tile layout the codec reads (int4_vnni, bf16 scales)."""
    return sub.layout == "int4_vnni"


class TooManyEscapes(ValueError):
    """A layer's weights stray too far from its substitute for the residual form to pay."""


def substitute_sample(sub: QuantLinear) -> torch.Tensor:
    """Every RESIDUAL_SAMPLE_STRIDE-th byte of the substitute's values and scales (uint8):
    stored with the residual form, so that one made against another substitute is found
    stale."""
    return sub.qdata.reshape(-1)[::RESIDUAL_SAMPLE_STRIDE].clone()


def encode(weight: torch.Tensor, sub: QuantLinear) -> dict[str, torch.Tensor]:
    """weight [N, K] bf16 and its substitute -> {"residual": int8 [N K], "escapes": int16
    [E], "tile_escapes": int32 [N / 16 + 1], "substitute_sample": uint8} (E >= 1: a lone
    zero when nothing escapes)."""
    n, k = weight.shape
    if weight.dtype != torch.bfloat16:
        raise ValueError(f"the residual form is of bf16 weights, not {weight.dtype}")
    if not fits(sub) or (sub.out_features, sub.in_features) != (n, k):
        raise ValueError(f"substitute {sub} does not match weight [{n}, {k}] in the tile layout")
    if n * k >= 2**31:
        raise ValueError(f"weight [{n}, {k}] has too many values for int32 escape counts")
    weight = weight.contiguous()
    residual = torch.empty(n * k, dtype=torch.int8)
    escapes = torch.zeros(n * k, dtype=torch.int16)
    tile_escapes = torch.empty(n // 16 + 1, dtype=torch.int32)
    count = _lib().subspec_residual_encode(
        sub.qdata.data_ptr(), weight.data_ptr(), residual.data_ptr(), escapes.data_ptr(),
        tile_escapes.data_ptr(), n, k, sub.group_size,
    )  # fmt: skip
    if count < 0:
        raise ValueError(f"the residual codec refused W [{n}, {k}], group {sub.group_size}")
    return {"residual": residual, "escapes": escapes[: max(count, 1)].clone(),
            "tile_escapes": tile_escapes, "substitute_sample": substitute_sample(sub)}  # fmt: skip


def checked_parts(parts: dict[str, torch.Tensor], n: int, k: int) -> tuple[torch.Tensor, ...]:
    """(residual, escapes, tile_escapes) of encode()'s parts for W [n, k], checked for the
    kernels: sizes, dtypes, contiguity."""
    resid, escapes, tiles = parts["residual"], parts["escapes"], parts["tile_escapes"]
    if resid.numel() != n * k or tiles.numel() != n // 16 + 1:
        raise ValueError(f"residual parts do not match W [{n}, {k}]")
    dtypes = (resid.dtype, escapes.dtype, tiles.dtype)
    contiguous = all(t.is_contiguous() for t in (resid, escapes, tiles))
    if dtypes != (torch.int8, torch.int16, torch.int32) or not contiguous:
        raise ValueError("residual parts are not contiguous int8, int16 and int32 tensors")
    return resid, escapes, tiles


def raise_for(rc: int, n: int, k: int) -> None:
    """Raise for a residual kernel's non-zero return code (see csrc/residual.h)."""
    if rc == 2:
        raise ValueError(f"the residual form of W [{n}, {k}] is inconsistent: its escape table "
                         "disagrees with its residuals (a corrupted file?)")  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"residual kernel failed ({rc}) for W [{n}, {k}]")


def decode(parts: dict[str, torch.Tensor], sub: QuantLinear, out: torch.Tensor,
           simd: bool = True) -> torch.Tensor:  # fmt: skip
    """The weight [N, K] bf16 rebuilt into `out` (at least N K bf16 elements) from encode()'s
    parts and the same substitute; `simd` False: the scalar path (tests compare the two)."""
    n, k = sub.out_features, sub.in_features
    resid, escapes, tiles = checked_parts(parts, n, k)
    if out.numel() < n * k or not out.is_contiguous():
        raise ValueError(f"the buffer does not hold W [{n}, {k}]")
    weight = out[: n * k].view(n, k)
    rc = _lib().subspec_residual_decode(
        sub.qdata.data_ptr(), resid.data_ptr(), escapes.data_ptr(), escapes.numel(),
        tiles.data_ptr(), weight.data_ptr(), n, k, sub.group_size, int(simd),
        torch.get_num_threads(),
    )  # fmt: skip
    raise_for(rc, n, k)
    return weight

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

_VOID, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = native.residual()
    if lib is None:
        return None
    lib.subspec_residual_encode.restype = _I64
    lib.subspec_residual_encode.argtypes = [_VOID] * 5 + [_I64] * 3
    lib.subspec_residual_decode.restype = _INT
    lib.subspec_residual_decode.argtypes = [_VOID] * 5 + [_I64] * 3 + [_INT] * 2
    lib.subspec_residual_simd.restype = _INT
    return lib


def available() -> bool:
    """Whether residual streaming pays here: the codec builds and the CPU runs its AVX-512
    path, and the int4 tile layout builds. (The scalar path, the reference the tests check
    the AVX-512 one against, rebuilt a layer of the 1.5B in 52 ms on two Zen 4 cores, 8 ms
    with AVX-512: more than the 15 ms its 41 MB smaller read saves at 2.7 GB/s.)"""
    lib = _lib()
    return lib is not None and bool(lib.subspec_residual_simd()) and native.int4_vnni() is not None


def fits(sub: QuantLinear) -> bool:
    """Whether `sub` is in the tile layout the codec reads (int4_vnni, bf16 scales)."""
    return sub.layout == "int4_vnni"


class TooManyEscapes(ValueError):
    """A layer's weights stray too far from its substitute for the residual form to pay."""


def encode(weight: torch.Tensor, sub: QuantLinear) -> dict[str, torch.Tensor]:
    """weight [N, K] bf16 and its substitute -> {"residual": int8 [N K], "escapes": int16
    [E], "tile_escapes": int32 [N / 16 + 1]} (E >= 1: a lone zero when nothing escapes)."""
    n, k = weight.shape
    if not fits(sub) or (sub.out_features, sub.in_features) != (n, k):
        raise ValueError(f"substitute {sub} does not match weight [{n}, {k}] in the tile layout")
    weight = weight.contiguous()
    residual = torch.empty(n * k, dtype=torch.int8)
    escapes = torch.empty(n * k, dtype=torch.int16)
    tile_escapes = torch.empty(n // 16 + 1, dtype=torch.int32)
    count = _lib().subspec_residual_encode(
        sub.qdata.data_ptr(), weight.data_ptr(), residual.data_ptr(), escapes.data_ptr(),
        tile_escapes.data_ptr(), n, k, sub.group_size,
    )  # fmt: skip
    return {"residual": residual, "escapes": escapes[: max(count, 1)].clone(),
            "tile_escapes": tile_escapes}  # fmt: skip


def decode(parts: dict[str, torch.Tensor], sub: QuantLinear, out: torch.Tensor,
           simd: bool = True) -> torch.Tensor:  # fmt: skip
    """The weight [N, K] bf16 rebuilt into `out` (at least N K bf16 elements) from encode()'s
    parts and the same substitute; `simd` False: the scalar path (tests compare the two)."""
    n, k = sub.out_features, sub.in_features
    weight = out[: n * k].view(n, k)
    rc = _lib().subspec_residual_decode(
        sub.qdata.data_ptr(), parts["residual"].data_ptr(), parts["escapes"].data_ptr(),
        parts["tile_escapes"].data_ptr(), weight.data_ptr(), n, k, sub.group_size, int(simd),
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"residual decode failed ({rc}) for W [{n}, {k}]")
    return weight

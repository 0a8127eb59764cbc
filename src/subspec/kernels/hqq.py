"""Data-free HQQ for groups along a weight's rows (csrc/hqq.c), with torch as the fallback.

Both compute what hqq 0.2.x's `Quantizer.quantize(axis=1)` computes with its default solver
(the min-max start, then up to 20 proximal steps on the zero point with the scale fixed, lp
norm 0.7, beta 10, stopping when the chunk's mean error stops falling), then convert to the
substitutes' convention ``W ~ (q - off) * s + z`` with ``s`` and ``z`` rounded to the compute
dtype and ``q`` rounded against them. The native kernel reads each weight once a step, in
registers, on all threads; the torch path (no C compiler) allocates a chunk's temporaries on
every step and is ~50x slower.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from subspec.errors import SubspecError
from subspec.kernels import native

ITERS, LP_NORM, BETA = 20, 0.7, 10.0  # hqq's optimize_weights_proximal_legacy defaults
_VOID, _I64, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_IN = {torch.float32: 0, torch.bfloat16: 1}
_OUT = {torch.float32: 0, torch.bfloat16: 1}
_ERRORS = {-1: "bad arguments", -2: "a NaN or infinite weight", -3: "out of memory"}


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = native.hqq()
    if lib is None:
        return None
    lib.subspec_hqq_quantize.restype = _INT
    lib.subspec_hqq_quantize.argtypes = (
        [_VOID, _INT, _I64, _I64] + [_INT] * 4 + [_FLOAT] * 2 + [_INT] + [_VOID] * 4 + [_INT]
    )  # fmt: skip
    return lib


def quantize(
    w: Tensor, bits: int, group_size: int, dtype: torch.dtype, optimize: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """HQQ on one chunk of rows ``w[rows, in]`` (its error decides when the solver stops) ->
    ``q[rows, in]`` uint8, ``scale`` and ``zero`` ``[rows, in / g]`` in ``dtype``."""
    if dtype not in _OUT:
        raise ValueError(f"HQQ stores float32 or bfloat16 parameters, not {dtype}")
    lib = _lib()
    if lib is None or w.device.type != "cpu":
        return _quantize_torch(w, bits, group_size, dtype, optimize)
    if w.dtype not in _IN:
        w = w.float()
    w = w.contiguous()  # the caller's tensor is bound for the call
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.uint8)
    scale = torch.empty(rows, cols // group_size, dtype=torch.float32)
    zero = torch.empty_like(scale)
    rc = lib.subspec_hqq_quantize(
        w.data_ptr(), _IN[w.dtype], rows, cols, group_size, bits, int(optimize), ITERS,
        LP_NORM, BETA, _OUT[dtype], q.data_ptr(), scale.data_ptr(), zero.data_ptr(), None,
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        reason = _ERRORS.get(rc, f"error {rc}")
        raise SubspecError(f"cannot quantize a weight of shape {tuple(w.shape)}: {reason}")
    return q, scale.to(dtype), zero.to(dtype)


def _quantize_torch(w, bits, group_size, dtype, optimize):
    """The same computation in torch ops (groups summed in torch's order)."""
    rows, cols = w.shape
    groups = w.float().view(-1, group_size)  # [rows * in / g, g]
    if not torch.isfinite(groups).all():
        raise SubspecError(f"cannot quantize a weight of shape {tuple(w.shape)}: "
                           f"{_ERRORS[-2]}")  # fmt: skip
    max_q = 2**bits - 1
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)  # [groups, 1]
    inv = torch.where((hi - lo).abs() <= 1e-4, 1.0, max_q / (hi - lo)).clamp(max=2e4)
    zero = -lo * inv
    best = torch.tensor(float("inf"))
    for _ in range(ITERS if optimize else 0):
        q = torch.round(groups * inv + zero).clamp_(0, max_q)
        d = groups - (q - zero) / inv
        err = d.abs().mean()
        shrunk = (d.abs() - (1.0 / BETA) * d.abs().pow(LP_NORM - 1)).clamp_min_(0) * d.sign()
        zero = torch.mean(q - (groups - shrunk) * inv, -1, keepdim=True)
        if not err < best:
            break
        best = err
    off = 128 if bits == 8 else 8
    scale_f32 = 1.0 / inv
    scale, zero = scale_f32.to(dtype), ((off - zero) * scale_f32).to(dtype)
    q = ((groups - zero.float()) / scale.float()).round_().add_(off).clamp_(0, max_q)
    return q.to(torch.uint8).view(rows, cols), scale.view(rows, -1), zero.view(rows, -1)

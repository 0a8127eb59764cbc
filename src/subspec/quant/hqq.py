"""Data-free HQQ quantization of linear weights into QuantLinear substitutes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from subspec.kernels import hqq
from subspec.quant.linear import QuantLinear

SUPPORTED_BITS = (2, 3, 4, 8)
_QUANT_CHUNK_ELEMENTS = 1 << 24  # rows are quantized in chunks of about this many weights


def quantize_linear(
    weight: Tensor,
    bias: Tensor | None,
    *,
    bits: int = 4,
    group_size: int = 64,
    compute_dtype: torch.dtype = torch.bfloat16,
    optimize: bool = True,
) -> QuantLinear:
    """Quantize ``weight[out, in]`` with data-free HQQ (groups along ``in``) into a QuantLinear
    on ``weight``'s device (quantize_rows)."""
    return quantize_rows(
        lambda a, b: weight[a:b], weight.shape, bias, bits=bits, group_size=group_size,
        compute_dtype=compute_dtype, optimize=optimize, device=weight.device,
    )  # fmt: skip


def quantize_rows(
    read_rows: Callable[[int, int], Tensor],
    shape: tuple[int, int],
    bias: Tensor | None,
    *,
    bits: int = 4,
    group_size: int = 64,
    compute_dtype: torch.dtype = torch.bfloat16,
    optimize: bool = True,
    device: torch.device | str = "cpu",
) -> QuantLinear:
    """Quantize a weight of ``shape`` [out, in] that ``read_rows(a, b)`` gives a block of rows
    at a time (``weight[a:b]``): it is never whole in memory.

    HQQ fits scales and zero points (kernels/hqq.py); ``q`` is then re-rounded against those
    parameters as stored in ``compute_dtype`` so that storage rounding does not add error. Rows
    are processed in chunks of about 16 M weights, as subspec has always called hqq: the
    solver's early stop looks at a chunk's mean error.
    """
    out_features, in_features = shape
    _check_config(in_features, bits, group_size)
    q = torch.empty(out_features, in_features, dtype=torch.uint8, device=device)
    # [in / g, out, 2]: (scale, zero) pairs
    scales_and_zeros = torch.empty(in_features // group_size, out_features, 2,
                                   dtype=compute_dtype, device=device)  # fmt: skip
    step = max(1, _QUANT_CHUNK_ELEMENTS // in_features)
    for a in range(0, out_features, step):
        b = min(a + step, out_features)
        q[a:b], scale, zero = hqq.quantize(read_rows(a, b), bits, group_size, compute_dtype,
                                           optimize)  # fmt: skip
        scales_and_zeros[:, a:b, 0] = scale.T  # scale, zero: [rows, in / g]
        scales_and_zeros[:, a:b, 1] = zero.T
    bias = None if bias is None else bias.to(compute_dtype)
    return QuantLinear(q, scales_and_zeros, bias, bits=bits, group_size=group_size)


def _check_config(in_features: int, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} not supported; choose one of {SUPPORTED_BITS}")
    if group_size % 8 or in_features % group_size:
        raise ValueError(
            f"group_size={group_size} must be a multiple of 8 dividing in_features={in_features}"
        )

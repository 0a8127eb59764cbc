"""Data-free HQQ quantization of linear weights into QuantLinear substitutes."""

from __future__ import annotations

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
    """Quantize ``weight[out, in]`` with data-free HQQ (groups along ``in``) into a QuantLinear.

    HQQ fits scales and zero points (kernels/hqq.py); ``q`` is then re-rounded against those
    parameters as stored in ``compute_dtype`` so that storage rounding does not add error. Rows
    are processed in chunks of about 16 M weights, as subspec has always called hqq: the
    solver's early stop looks at a chunk's mean error. The result lives on ``weight``'s device.
    """
    out_features, in_features = weight.shape
    _check_config(in_features, bits, group_size)
    rows = max(1, _QUANT_CHUNK_ELEMENTS // in_features)
    parts = [
        _quantize_rows(chunk, bits, group_size, compute_dtype, optimize)
        for chunk in weight.split(rows)
    ]
    q = torch.cat([p[0] for p in parts])  # [out, in] uint8
    scales_and_zeros = torch.cat([p[1] for p in parts], dim=1)  # [in / g, out, 2]
    bias = None if bias is None else bias.to(compute_dtype)
    return QuantLinear(q, scales_and_zeros, bias, bits=bits, group_size=group_size)


def _check_config(in_features: int, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} not supported; choose one of {SUPPORTED_BITS}")
    if group_size % 8 or in_features % group_size:
        raise ValueError(
            f"group_size={group_size} must be a multiple of 8 dividing in_features={in_features}"
        )


def _quantize_rows(
    w: Tensor, bits: int, group_size: int, dtype: torch.dtype, optimize: bool
) -> tuple[Tensor, Tensor]:
    """HQQ on a block of rows ``w[rows, in]`` -> (q[rows, in] uint8, scales_and_zeros)."""
    q, scale, zero = hqq.quantize(w, bits, group_size, dtype, optimize)  # [rows, in / g] each
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [in / g, rows, 2]
    return q, scales_and_zeros

"""Data-free HQQ quantization of linear weights into QuantLinear substitutes."""

from __future__ import annotations

import torch
from torch import Tensor

from subspec.errors import SubspecError
from subspec.quant.linear import QuantLinear, offset

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

    HQQ fits scales and zero points; ``q`` is then re-rounded against those parameters as stored
    in ``compute_dtype`` so that storage rounding does not add error. Rows are processed in
    chunks to bound memory. The result lives on ``weight``'s device.
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
    rows, in_features = w.shape
    off = offset(bits)
    scale, zero_hqq = _hqq_params(w, bits, group_size, optimize)  # [rows, in / g] each
    zero = ((off - zero_hqq) * scale).to(dtype)
    scale = scale.to(dtype)
    groups = w.float().view(rows, -1, group_size)  # [rows, in / g, g]
    q = (groups - zero.float()[..., None]) / scale.float()[..., None]
    q = q.round_().add_(off).clamp_(0, 2**bits - 1).to(torch.uint8).view(rows, in_features)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [in / g, rows, 2]
    return q, scales_and_zeros


def _hqq_params(w: Tensor, bits: int, group_size: int, optimize: bool) -> tuple[Tensor, Tensor]:
    """Per-group scale and HQQ zero point (W ~ (q - zero) * scale), fp32 [rows, in / g] each:
    HQQ's solver, or min-max rounding (HQQ's own without ``optimize``; computed here when hqq
    is not installed)."""
    rows = w.shape[0]
    try:
        from hqq.core.quantize import Quantizer  # slow import (~3 s), only needed here
    except ImportError:
        if optimize:
            raise SubspecError(
                "HQQ's solver needs the hqq package (or quantize with --no-hqq-optimize)"
            ) from None
        return _min_max_params(w.float().view(rows, -1, group_size), bits)
    _, meta = Quantizer.quantize(
        w, nbits=bits, group_size=group_size, optimize=optimize, axis=1, bitpack=False,
        device=w.device,
    )  # fmt: skip
    return meta["scale"].float().view(rows, -1), meta["zero"].float().view(rows, -1)


def _min_max_params(groups: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Min-max rounding as HQQ computes it: groups [rows, in / g, g] -> scale, zero."""
    lo, hi = groups.amin(-1), groups.amax(-1)  # [rows, in / g]
    inv_scale = ((2**bits - 1) / (hi - lo)).clamp(max=2e4)
    return 1.0 / inv_scale, -lo * inv_scale

"""Low-bit substitutes: HQQ quantization, the QuantLinear module and its kernels, the cache."""

from subspec.quant.cache import load_quantized, save_quantized
from subspec.quant.hqq import SUPPORTED_BITS, quantize_linear, quantize_rows
from subspec.quant.linear import QuantLinear
from subspec.sizes import quantized_nbytes

__all__ = [
    "SUPPORTED_BITS",
    "QuantLinear",
    "load_quantized",
    "quantize_linear",
    "quantize_rows",
    "quantized_nbytes",
    "save_quantized",
]

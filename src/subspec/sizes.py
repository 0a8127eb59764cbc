"""Byte sizes of a runtime's parts, from shapes and dtype names alone.

Nothing here imports torch, so that sizing a model (`subspec plan`, the checks before a load)
starts in a fraction of a second. A dtype is given by name ("bfloat16") or as a torch dtype, a
device by name ("cuda:0") or as a torch device.
"""

from __future__ import annotations

import functools
from pathlib import Path

ALIGN = 4096  # every tensor and file boundary in a layer file (offload/layer_file.py)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
INT4_GROUP_SIZES = (32, 64, 128, 256)  # group sizes torch's int4 kernels take
BITPACK_SCRATCH_ELEMENTS = 1 << 24  # the bitpack matmul's dequantized block: 64 MiB in fp32
WIDEN_SCRATCH_ELEMENTS = 1 << 23  # fp32 elements of the reused widening buffer at most (32 MiB)
# heap glibc keeps between forwards (runtime/sizing.py): its mmap threshold follows the
# largest block freed, so later logits and scores come from a heap that fragments. On the 1.5B
# at 1.78 GB generation peaked 17 MB past a plan with 32 MB here in a fresh process, 38 MB past
# it in bench's second runtime of one process; a fixed 1 MiB threshold held it 40 MB lower but
# cost 15% of the speed (a page fault for every page of every large block)
CPU_ALLOCATOR_SLACK = 80 << 20
CUDA_CONTEXT_BYTES = 512 << 20  # the CUDA context and kernel images, outside torch's allocator


def align_up(n: int, alignment: int = ALIGN) -> int:
    """Round ``n`` up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment


def dtype_name(dtype) -> str:
    """ "bfloat16" for "bfloat16" and for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def itemsize(dtype) -> int:
    """Bytes per element of a dtype."""
    return DTYPE_BYTES[dtype_name(dtype)]


def device_type(device) -> str:
    """ "cuda" for "cuda:1" and for torch.device("cuda", 1)."""
    return str(device).split(":")[0]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (avx512_bf16, amx_tile, ...): the
    one probe every CPU-dependent choice asks (the kernels check their own at run time). Where
    there is no such file, the bf16 features are asked of torch, and nothing else is known."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        import torch

        probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
        return frozenset(flag for flag, probe in probes.items()
                         if getattr(torch.cpu, probe, lambda: False)())  # fmt: skip


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX tiles)."""
    return bool({"avx512_bf16", "amx_tile"} & cpu_flags())


def cpu_has_avx512_vbmi2() -> bool:
    """Whether this CPU has the AVX-512 subsets the residual codec's fast path needs (F, BW,
    VL, VBMI2)."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vbmi2"} <= cpu_flags()


def rebuilds_in_matmul(exact: bool) -> bool:
    """Whether a weight streamed in residual form is rebuilt block by block inside the exact
    matmul (exact.exact_residual_linear), with no whole-weight buffer: with exact numerics,
    except on an AMX CPU, whose exact path computes other bits than the fused kernel's. The
    plan (runtime/sizing.py) and the runtime (offload/streamed.Rebuild) both ask this."""
    return exact and "amx_tile" not in cpu_flags()


def widens(dtype, device) -> bool:
    """Whether dense weights of this dtype on this device go through layers.widened_linear."""
    cpu = device_type(device) == "cpu"
    return dtype_name(dtype) == "bfloat16" and cpu and not cpu_has_native_bf16()


def widen_scratch_bytes(dtype, device, largest_weight: int) -> int:
    """Bytes of the buffer `widened_linear` grows to for weights of this dtype on this device,
    the largest of them holding `largest_weight` elements."""
    return min(WIDEN_SCRATCH_ELEMENTS, largest_weight) * 4 if widens(dtype, device) else 0


def int4_cuda_fits(in_features: int, compute_dtype) -> bool:
    """Whether torch's CUDA int4 kernel takes this input width and dtype (bf16 only; 2/3-bit
    values are held in its 4-bit nibbles)."""
    return dtype_name(compute_dtype) == "bfloat16" and in_features % 32 == 0


def held_bits(bits: int, group_size: int, out_features: int, in_features: int, dtype, device):
    """Bits per value a QuantLinear holds in memory on ``device``: 4 for 2/3-bit values in
    torch's CUDA int4 layout, else ``bits``."""
    if device_type(device) != "cuda" or bits >= 4 or group_size not in INT4_GROUP_SIZES:
        return bits
    fits = out_features % 16 == 0 and int4_cuda_fits(in_features, dtype)
    return 4 if fits else bits


def quantized_nbytes(
    out_features: int, in_features: int, bits: int, group_size: int, *, bias: bool = False,
    compute_dtype="bfloat16", device="cpu",
) -> int:  # fmt: skip
    """Bytes a QuantLinear of this shape holds in memory on ``device``."""
    item = itemsize(compute_dtype)
    held = held_bits(bits, group_size, out_features, in_features, compute_dtype, device)
    values = out_features * in_features * held // 8
    scales_and_zeros = (in_features // group_size) * out_features * 2 * item
    return values + scales_and_zeros + (out_features * item if bias else 0)


def kv_nbytes(num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype) -> int:
    """Bytes a KVCache of this shape occupies."""
    return 2 * num_layers * num_kv_heads * capacity * head_dim * itemsize(dtype)


def layer_nbytes(cfg, dtype) -> int:
    """Bytes of one decoder layer of ModelConfig `cfg` as a staging buffer holds it
    (4096-aligned tensors)."""
    item = itemsize(dtype)
    numels = [o * i for o, i in cfg.linear_shapes.values()] + [cfg.hidden_size] * 2
    numels += [cfg.qkv_out] if cfg.qkv_bias else []
    numels += [cfg.head_dim, cfg.head_dim] if cfg.qk_norm else []
    return sum(align_up(n * item) for n in numels)


# the most escapes a layer streamed in residual form may hold (kernels/residual.py), as a share
# of its weights: more, and the layers stream whole (the 1.5B Qwen2.5: 7%, 8% in its worst layer)
RESIDUAL_ESCAPE_SHARE = 0.125
RESIDUAL_SAMPLE_STRIDE = 4093  # bytes of a substitute between two bytes its residual form keeps


def residual_layer_nbytes(cfg, dtype, group_size: int) -> int:
    """Bytes of one decoder layer in residual form at most, as a staging buffer holds it
    (4096-aligned tensors): per linear a byte a weight, the escape count before each tile of
    16 rows (int32) and the sample of its 4-bit substitute (every RESIDUAL_SAMPLE_STRIDE-th
    byte); the escapes (2 bytes each, RESIDUAL_ESCAPE_SHARE of the weights at most, a tensor
    per linear); norms and bias in `dtype`."""
    shapes = cfg.linear_shapes.values()
    weights = sum(o * i for o, i in shapes)
    linears = sum(
        align_up(o * i) + align_up(4 * (o // 16 + 1))
        + align_up(-(-quantized_nbytes(o, i, 4, group_size, compute_dtype=dtype)
                     // RESIDUAL_SAMPLE_STRIDE))
        for o, i in shapes
    )  # fmt: skip
    escapes = 2 * int(RESIDUAL_ESCAPE_SHARE * weights) + len(shapes) * ALIGN
    vectors = [cfg.hidden_size] * 2 + ([cfg.qkv_out] if cfg.qkv_bias else [])
    vectors += [cfg.head_dim, cfg.head_dim] if cfg.qk_norm else []
    return linears + escapes + sum(align_up(v * itemsize(dtype)) for v in vectors)


def substitute_nbytes(cfg, bits: int, group_size: int, dtype, device="cpu") -> int:
    """Bytes of one layer's substitute on `device`: quantized linears (in the device's layout)
    plus full-precision norms and bias."""
    if bits == 16:
        return layer_nbytes(cfg, dtype)
    linears = sum(
        quantized_nbytes(o, i, bits, group_size, compute_dtype=dtype, device=device)
        for o, i in cfg.linear_shapes.values()
    )
    extras = 2 * cfg.hidden_size + (cfg.qkv_out if cfg.qkv_bias else 0)
    return linears + extras * itemsize(dtype)


def workspace_nbytes(cfg, tokens: int, kv_len: int, dtype, device, logit_rows: int = 1,
                     noise_rows: int = 0) -> int:  # fmt: skip
    """Fast memory a forward over up to `tokens` rows attending to `kv_len` slots needs beyond
    the weights and the cache. On a CUDA device: one layer's activations, fp32 attention scores
    and probabilities, K/V repeated per query head, fp32 logits and their softmax for every
    row, the bitpack matmul's block and the CUDA context. On a CPU, the larger of a prefill
    chunk's (activations and fp32 scores; logits of its last row only) and a round's (the same
    for `logit_rows` tree rows, with fp32 logits and softmax of every row); and `noise_rows`
    fp16 rows of a sampled request's future draws (speculative/proposals.py). (On the 1.5B at
    1.78 GB generation held 80-165 MB beyond the planned parts with 4-1,900-token prompts;
    this and CPU_ALLOCATOR_SLACK count 220 MB.)"""
    item = itemsize(dtype)
    per_row = (4 * cfg.hidden_size + cfg.qkv_out + 3 * cfg.intermediate_size) * item
    per_row += cfg.num_heads * kv_len * 4  # the row's attention scores
    logits = 2 * cfg.vocab_size * 4  # a row's fp32 logits and their softmax
    noise = noise_rows * cfg.vocab_size * 2
    if device_type(device) != "cuda":
        return max(tokens * per_row, logit_rows * (per_row + logits) + noise)
    repeated_kv = 2 * cfg.num_heads * kv_len * cfg.head_dim * item
    bitpack = BITPACK_SCRATCH_ELEMENTS * (4 + item)
    scores_again = cfg.num_heads * tokens * kv_len * 4  # the probabilities
    return (tokens * (per_row + logits) + noise + scores_again + repeated_kv + bitpack
            + CUDA_CONTEXT_BYTES)  # fmt: skip

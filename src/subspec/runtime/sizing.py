"""Sizing a runtime before loading it: the bytes of every part and the placement under the
budget, from config.json and safetensors headers only (no weight is read, torch is not
imported), for `build_runtime`'s checks and `subspec plan`."""

from __future__ import annotations

import os
import platform
from dataclasses import replace

from subspec import sizes as nb
from subspec.config import (
    DEFAULT_CONTEXT,
    METHODS,
    RuntimeConfig,
    format_size,
    methods_to_load,
)
from subspec.errors import SubspecError
from subspec.hub.models import resolve_model
from subspec.memory import available_bytes
from subspec.model.checkpoint import EMBED, Checkpoint, lm_head_name
from subspec.model.config import ModelConfig
from subspec.offload.planner import ModelSizes, Placement, minimum_parts, plan

# What the process takes of a CPU budget before any weight (the interpreter, torch,
# transformers, a tokenizer): 400-440 MB measured with the Qwen2.5 and SmolLM2 tokenizers.
# `subspec plan`, which loads none of them, counts this; a runtime measures its own.
PROCESS_BYTES_ESTIMATE = 420_000_000


def budget_counts_process(cfg: RuntimeConfig) -> bool:
    """Whether cfg's budget covers the process itself (its RSS before the weights, its working
    memory, the allocator's slack), not only the model's parts: on a CPU with a budget, unless
    $SUBSPEC_BUDGET_WEIGHTS_ONLY is 1 (the suite sets it: budgets of a few MB place its tiny
    models). On a GPU the budget is device memory, which the process's RSS is not."""
    weights_only = os.environ.get("SUBSPEC_BUDGET_WEIGHTS_ONLY") == "1"
    return (
        cfg.memory_budget is not None and nb.device_type(cfg.device) == "cpu" and not weights_only
    )


def process_bytes(cfg: RuntimeConfig, measured: int | None = None) -> int:
    """The share of cfg's budget the process itself takes: `measured` (its RSS before the
    weights load) or PROCESS_BYTES_ESTIMATE, with the heap the allocator keeps between
    forwards; 0 where the budget does not count it (budget_counts_process)."""
    if not budget_counts_process(cfg):
        return 0
    return (PROCESS_BYTES_ESTIMATE if measured is None else measured) + nb.CPU_ALLOCATOR_SLACK


def model_sizes(cfg: RuntimeConfig, ckpt: Checkpoint, model_cfg: ModelConfig,
                extra_bytes: int = 0, process: int = 0) -> ModelSizes:  # fmt: skip
    """Bytes of every part in fast memory, for the planner; `extra_bytes`: what else stays
    resident (classic speculation's draft); `process`: the process's own (process_bytes)."""
    m, dt, spec, device = model_cfg, cfg.dtype, cfg.spec, cfg.device
    item = nb.itemsize(dt)
    tied = lm_head_name(ckpt, m) == EMBED
    sub = "subspec" in cfg.methods
    table = m.vocab_size * m.hidden_size * item  # embeddings or LM head
    largest = max(m.vocab_size * m.hidden_size, *(o * i for o, i in m.linear_shapes.values()))
    draft_head = 0
    if sub and spec.head_bits != 16:
        draft_head = nb.quantized_nbytes(
            m.vocab_size, m.hidden_size, spec.head_bits, spec.group_size, compute_dtype=dt,
            device=device,
        )  # fmt: skip
    residual = residual_streams(cfg, m)
    return ModelSizes(
        num_layers=m.num_layers,
        layer_bytes=nb.layer_nbytes(m, dt),
        staging_bytes=nb.residual_layer_nbytes(m, dt, spec.group_size) if residual else 0,
        rebuild_bytes=rebuild_bytes(cfg, m) if residual else 0,
        # on a CPU a draft step is bound by its reads: 4-bit copies of the resident layers too
        substitutes_everywhere=sub and spec.bits < 16 and nb.device_type(device) == "cpu",
        substitute_bytes=(
            nb.substitute_nbytes(m, spec.bits, spec.group_size, dt, device) if sub else 0
        ),
        embed_bytes=0 if cfg.map_embeddings and not tied else table,
        lm_head_bytes=0 if tied else table,
        norm_bytes=m.hidden_size * item,
        kv_bytes=nb.kv_nbytes(m.num_layers, m.num_kv_heads, m.head_dim, cfg.capacity, dt),
        extra_bytes=extra_bytes,
        process_bytes=process,
        draft_head_bytes=draft_head,
        # exact numerics run every dense weight through kernels/exact.py, which never widens
        scratch_bytes=0 if cfg.exact else nb.widen_scratch_bytes(dt, device, largest),
        head_can_stream=not (sub and spec.head_bits == 16),
        workspace_bytes=0
        if nb.device_type(device) == "cpu" and not budget_counts_process(cfg)
        else nb.workspace_nbytes(
            m,
            max(cfg.prefill_chunk, spec.tree_size),
            cfg.capacity,
            dt,
            device,
            logit_rows=spec.tree_size if sub else 1,
            noise_rows=spec.draws_ahead if sub else 0,
        ),
    )


def residual_streams(cfg: RuntimeConfig, model_cfg: ModelConfig) -> bool:
    """Whether streamed layers go in residual form (kernels/residual.py): SubSpec's bf16
    target on an x86-64 CPU with AVX-512 (the codec's fast path) and 4-bit substitutes in the
    int4 kernel's tile layout, where a layer in that form takes fewer bytes (not so for tiny
    layers, padded to 4 KB a tensor), unless spec.residual_stream is off. (Where the kernels
    do not build, or a layer strays too far from its substitute, build_runtime plans again
    without it.)"""
    spec, m = cfg.spec, model_cfg
    shapes = all(o % 16 == 0 and i % 64 == 0 for o, i in m.linear_shapes.values())
    return (
        "subspec" in cfg.methods and spec.residual_stream and spec.bits == 4
        and spec.group_size % 64 == 0 and cfg.dtype == "bfloat16" and shapes
        and nb.device_type(cfg.device) == "cpu" and platform.machine() in ("x86_64", "AMD64")
        and nb.cpu_has_avx512_vbmi2()
        and nb.residual_layer_nbytes(m, cfg.dtype, spec.group_size) < nb.layer_nbytes(m, cfg.dtype)
    )  # fmt: skip


def rebuild_bytes(cfg: RuntimeConfig, model_cfg: ModelConfig) -> int:
    """The buffer a layer streamed in residual form rebuilds its largest weight into: none
    where the exact kernel rebuilds it block by block (sizes.rebuilds_in_matmul)."""
    if nb.rebuilds_in_matmul(cfg.exact):
        return 0
    return max(o * i for o, i in model_cfg.linear_shapes.values()) * nb.itemsize(cfg.dtype)


def resolve_context(cfg: RuntimeConfig, model_cfg: ModelConfig) -> RuntimeConfig:
    """cfg with its context settled: DEFAULT_CONTEXT capped at the model's longest context
    (max_position_embeddings, and its sliding window where one applies) when unset; a context
    above it is refused."""
    most = model_cfg.longest_context
    if cfg.context is None:
        return replace(cfg, context=min(DEFAULT_CONTEXT, most))
    if cfg.context > most:
        limit = f"max_position_embeddings of {model_cfg.max_position_embeddings}"
        if most == model_cfg.sliding_window:
            limit = (f"sliding window of {most} tokens (subspec attends to every token, so a "
                     "longer context would diverge from the model)")  # fmt: skip
        raise SubspecError(f"--context {cfg.context} is above the model's {limit}")
    return cfg


def plan_checked(cfg: RuntimeConfig, ckpt: Checkpoint, model_cfg: ModelConfig,
                 extra_bytes: int = 0, process: int = 0) -> Placement:  # fmt: skip
    """The placement for cfg, from headers only (no weight is read), refusing a KV cache
    that cannot fit in free memory and a budget below the minimum (naming each method's)."""
    sizes = model_sizes(cfg, ckpt, model_cfg, extra_bytes, process)
    check_kv_fits(cfg, sizes)
    try:
        return plan(sizes, cfg.memory_budget, cfg.n_buffers)
    except SubspecError as e:
        mins = method_minimums(cfg, ckpt, model_cfg, process)
        each = ", ".join(f"{m} {format_size(b)}" for m, b in mins.items())
        raise SubspecError(f"{e}; the smallest budget of each method: {each}") from None


def check_kv_fits(cfg: RuntimeConfig, sizes: ModelSizes) -> None:
    """Refuse a KV cache larger than the memory free on the device now."""
    free = available_bytes(cfg.device)
    if sizes.kv_bytes > free:
        raise SubspecError(
            f"the KV cache for --context {cfg.context} needs {format_size(sizes.kv_bytes)}, but "
            f"only {format_size(free)} of memory is available on {cfg.device}; lower --context"
        )


def method_sizes(cfg: RuntimeConfig, ckpt: Checkpoint, model_cfg: ModelConfig,
                 method: str, process: int = 0) -> ModelSizes:  # fmt: skip
    """The sizes of a runtime that runs `method` (its draft included), from headers only."""
    m_cfg = replace(cfg, methods=methods_to_load(method))
    return model_sizes(m_cfg, ckpt, model_cfg, draft_bytes(m_cfg, model_cfg), process)


def method_minimums(cfg: RuntimeConfig, ckpt: Checkpoint, model_cfg: ModelConfig,
                    process: int = 0) -> dict:  # fmt: skip
    """Method -> the smallest budget it runs in (classic only with a draft model)."""
    out = {}
    for method in METHODS:
        if method == "classic" and not cfg.draft_model:
            continue
        sizes = method_sizes(cfg, ckpt, model_cfg, method, process)
        out[method] = sum(minimum_parts(sizes, cfg.n_buffers).values())
    return out


def draft_bytes(cfg: RuntimeConfig, target_cfg: ModelConfig) -> int:
    """Bytes classic speculation's draft keeps resident (0 without it), from headers only."""
    if "classic" not in cfg.methods:
        return 0
    draft_cfg = draft_config(cfg)
    model_dir = resolve_model(draft_cfg.model, progress=False)
    model_cfg = ModelConfig.from_dir(model_dir)
    draft_cfg = resolve_context(draft_cfg, model_cfg)
    with Checkpoint(model_dir) as ckpt:
        return plan(model_sizes(draft_cfg, ckpt, model_cfg), None).resident_bytes


def draft_config(cfg: RuntimeConfig) -> RuntimeConfig:
    """Classic speculation's draft, configured like a target: everything resident, embedding
    rows read on demand (they need not take budget)."""
    return replace(
        cfg, model=cfg.draft_model, memory_budget=None, methods=("vanilla",),
        draft_model=None, map_embeddings=True,
    )  # fmt: skip

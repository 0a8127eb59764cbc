"""Preparing weights for a placement: resident layers, per-layer files for streaming, and the
low-bit substitutes, the last two cached on disk and keyed by the checkpoint's fingerprint."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from rich.progress import Progress

from subspec import quant
from subspec.errors import SubspecError
from subspec.files import safetensors_fingerprint
from subspec.kernels import residual
from subspec.memory import release_free_memory
from subspec.model.checkpoint import Checkpoint, layer_norms, layer_tensors
from subspec.model.config import ModelConfig
from subspec.model.layers import LINEAR_NAMES, LayerWeights, dense_layer, substitute_layer
from subspec.offload.layer_file import layer_path, read_manifest, read_tensor, write_layer_file
from subspec.sizes import RESIDUAL_ESCAPE_SHARE, itemsize, layer_nbytes

log = logging.getLogger(__name__)


def fingerprint(ckpt: Checkpoint) -> str:
    """A short hash of the checkpoint's files (names, sizes, safetensors headers)."""
    return safetensors_fingerprint(set(ckpt.file_of.values()))[:16]


def load_resident(ckpt, cfg, layers, dtype, device, exact=False) -> dict[int, LayerWeights]:
    """Full-precision layers held in fast memory (`exact`: row-invariant linears)."""
    return {
        i: dense_layer(
            {k: v.to(device) for k, v in layer_tensors(ckpt, cfg, i, dtype).items()}, exact
        )
        for i in layers
    }


def layer_sources(ckpt, cfg, layers, dtype) -> dict:
    """{layer: a function reading its tensors from the checkpoint}, for a slow-tier store."""
    return {i: functools.partial(layer_tensors, ckpt, cfg, i, dtype) for i in layers}


def residual_sources(ckpt, cfg, layers, dtype, substitutes: dict) -> dict:
    """{layer: a function returning its tensors in residual form}: each linear weight as
    kernels/residual.encode's parts against the layer's substitute (`substitutes[layer]`,
    LayerWeights), norms and bias as they are. Raises residual.TooManyEscapes when more than
    RESIDUAL_ESCAPE_SHARE of a layer's weights escape (its file would outgrow the staging
    buffers planned for it, sizes.residual_layer_nbytes)."""

    def tensors(i: int) -> dict[str, torch.Tensor]:
        t = layer_tensors(ckpt, cfg, i, dtype)
        weights = escapes = 0
        for name in LINEAR_NAMES:
            weight = t.pop(f"{name}.weight")
            parts = residual.encode(weight, getattr(substitutes[i], name))
            t |= {f"{name}.{part}": v for part, v in parts.items()}
            weights += weight.numel()
            escapes += parts["tile_escapes"][-1].item()
        if escapes > int(RESIDUAL_ESCAPE_SHARE * weights):
            raise residual.TooManyEscapes(
                f"{escapes} of layer {i}'s {weights} weights escape their substitute"
            )
        return t

    return {i: functools.partial(tensors, i) for i in layers}


def drop_stale_residual_files(directory: Path, substitutes: dict) -> None:
    """Delete the residual-form layer files in `directory` made against other substitutes
    than `substitutes` ({layer: LayerWeights}): their stored samples of the substitute
    differ (files of an older build, a copied cache); ensure_files writes them anew."""
    for i, sub in substitutes.items():
        path = layer_path(directory, i)
        try:
            manifest = read_manifest(path)
            same = all(
                torch.equal(read_tensor(path, manifest, f"{name}.substitute_sample"),
                            residual.substitute_sample(getattr(sub, name)))
                for name in LINEAR_NAMES
            )  # fmt: skip
        except (OSError, SubspecError, StopIteration, RuntimeError):
            same = False  # missing, truncated, or without samples
        if not same:
            path.unlink(missing_ok=True)


def head_chunk_rows(cfg: ModelConfig, dtype: torch.dtype, buffer_bytes: int | None = None) -> int:
    """Rows of the LM head per streamed chunk: as many as fit a staging buffer of
    `buffer_bytes` (default: a full-precision layer's)."""
    return (buffer_bytes or layer_nbytes(cfg, dtype)) // (cfg.hidden_size * itemsize(dtype))


def head_sources(head_rows, cfg, dtype, first_unit: int, buffer_bytes: int | None = None) -> dict:
    """{unit: a function returning one chunk {"weight": [rows, H]} of the LM head}, numbered
    from `first_unit`, each fitting a staging buffer of `buffer_bytes` (see head_chunk_rows);
    `head_rows(a, b)` reads the head's rows [a, b) (it is never whole in memory)."""
    rows = head_chunk_rows(cfg, dtype, buffer_bytes)

    def chunk(unit: int) -> dict[str, torch.Tensor]:
        start = (unit - first_unit) * rows
        return {"weight": head_rows(start, min(start + rows, cfg.vocab_size))}  # [rows, H]

    n_chunks = -(-cfg.vocab_size // rows)
    units = range(first_unit, first_unit + n_chunks)
    return {u: functools.partial(chunk, u) for u in units}


def ensure_layer_files(ckpt, cfg, layers, dtype, directory: Path, progress: Progress | None):
    """Write the per-layer files of `layers` once; returns {layer: manifest}."""
    sources = layer_sources(ckpt, cfg, layers, dtype)
    return ensure_files(directory, sources, "writing layer files", progress)


def ensure_head_files(head_rows, cfg, dtype, first_unit: int, directory: Path, progress):
    """Write the LM head [V, H] (rows [a, b) from `head_rows(a, b)`, read only for missing
    files) as chunk files numbered from `first_unit`; returns {unit: manifest}."""
    sources = head_sources(head_rows, cfg, dtype, first_unit)
    return ensure_files(directory, sources, "writing LM head chunks", progress)


def ensure_files(directory: Path, sources: dict, label: str, progress) -> dict:
    """Write a layer file for every unit of `sources` ({unit: () -> tensors}) that has no
    valid one in `directory`; returns {unit: manifest}."""
    directory.mkdir(parents=True, exist_ok=True)
    manifests, missing = {}, []
    for i in sources:
        path = layer_path(directory, i)
        try:
            manifests[i] = read_manifest(path)
        except FileNotFoundError:
            missing.append(i)
        except (OSError, SubspecError) as e:  # truncated or stale
            log.warning("rewriting %s: %s", path, e)
            missing.append(i)
    task = progress and missing and progress.add_task(label, total=len(missing))
    for i in missing:
        manifests[i] = write_unit(directory, sources, i)
        if task is not None and progress:
            progress.advance(task)
    return manifests


def write_unit(directory: Path, sources: dict, unit: int):
    """Write `unit`'s layer file in `directory` from `sources` ({unit: () -> tensors});
    returns its manifest."""
    manifest = write_layer_file(layer_path(directory, unit), sources[unit]())
    release_free_memory()  # a layer's temporaries: malloc would keep them in RSS
    return manifest


def load_substitutes(ckpt, cfg, layers, dtype, device, spec, directory: Path, progress):
    """Low-bit substitutes of `layers`, one cache file per layer in `directory` (so that any
    budget reuses them and an interrupted build keeps its finished layers).

    spec.bits == 16 gives full-precision copies: a draft identical to the target."""
    if spec.bits == 16:
        return load_resident(ckpt, cfg, layers, dtype, device)
    meta = _quant_meta(spec, spec.bits, dtype)
    # cached substitutes load straight into the device's layout
    cached = {i: quant.load_quantized(directory / f"layer_{i:05d}.safetensors", meta, device)
              for i in layers}  # fmt: skip
    missing = [i for i in layers if cached[i] is None]
    task = progress and missing and progress.add_task(
        f"quantizing {len(missing)} layers to {spec.bits}-bit", total=len(missing))  # fmt: skip
    for i in missing:  # quantized on the CPU (no device temporaries), then moved
        # a layer file in residual form against the old substitute would rebuild wrong weights
        for residual_files in directory.glob("residual-*"):
            layer_path(residual_files, i).unlink(missing_ok=True)
        t = layer_tensors(ckpt, cfg, i, dtype)
        linears = {name: _quantize(t[f"{name}.weight"], t.get(f"{name}.bias"), spec,
                                   spec.bits, dtype) for name in LINEAR_NAMES}  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        quant.save_quantized(directory / f"layer_{i:05d}.safetensors", linears, meta)
        cached[i] = {name: linear.to(device) for name, linear in linears.items()}
        release_free_memory()
        if task is not None and progress:
            progress.advance(task)
    return {
        i: substitute_layer(
            {k: v.to(device) for k, v in layer_norms(ckpt, cfg, i, dtype).items()}, cached[i]
        )
        for i in layers
    }


def residual_dir(substitutes_dir: Path, buffer_bytes: int) -> Path:
    """Where layer files in residual form against the substitutes in `substitutes_dir` live,
    with LM head chunks fitting staging buffers of `buffer_bytes` (inside it: a substitute
    rebuilt there deletes its layer's files, see load_substitutes)."""
    return substitutes_dir / f"residual-{buffer_bytes}"


def _quant_meta(spec, bits: int, dtype) -> dict[str, str]:
    return {"bits": str(bits), "group_size": str(spec.group_size), "dtype": str(dtype),
            "optimize": str(spec.hqq_optimize)}  # fmt: skip


def _quantize(weight, bias, spec, bits, dtype):
    return quant.quantize_linear(weight, bias, bits=bits, group_size=spec.group_size,
                                 compute_dtype=dtype, optimize=spec.hqq_optimize)  # fmt: skip


def load_draft_head(head_rows, shape, dtype, device, spec, path, progress):
    """The draft's LM head: a low-bit copy of the weight [V, H] = `shape` whose rows [a, b)
    `head_rows(a, b)` reads (only when the copy cached at `path` is missing or stale)."""
    meta = {"shape": str(tuple(shape)), **_quant_meta(spec, spec.head_bits, dtype)}
    head = quant.load_quantized(path, meta, device)
    if head is not None:
        return head["lm_head"]
    task = progress and progress.add_task("quantizing the draft LM head", total=1)
    # on the CPU, a chunk of rows at a time: the head is never whole in memory
    head = quant.quantize_rows(
        lambda a, b: head_rows(a, b).cpu(), shape, None, bits=spec.head_bits,
        group_size=spec.group_size, compute_dtype=dtype, optimize=spec.hqq_optimize,
    )  # fmt: skip
    quant.save_quantized(path, {"lm_head": head}, meta)
    release_free_memory()
    if task is not None and progress:
        progress.advance(task)
    return head.to(device)

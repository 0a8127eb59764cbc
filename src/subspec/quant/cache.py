"""The on-disk cache of substitutes: safetensors files with their settings and a checksum.

The cache always stores the device-independent ``bitpack`` form; loading repacks for the
device's kernel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from subspec.errors import SubspecError
from subspec.files import SafetensorsFile, atomic_output
from subspec.memory import release_free_memory
from subspec.quant.linear import Bitpacked, QuantLinear

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUANTIZER = "subspec-hqq-1"  # kernels/hqq.py's solver; a change to its results renames it


def save_quantized(path: str | os.PathLike, layers: dict[str, QuantLinear], meta: dict) -> None:
    """Write ``layers`` to a safetensors file atomically (temp file + ``os.replace``).

    ``meta`` must be JSON-serialisable; a checksum over meta, layer
    shapes and tensor bytes is stored so that ``load_quantized`` can reject corrupted files.
    """
    tensors, shapes = {}, {}
    for name, layer in layers.items():
        tensors[f"{name}.qweight"] = layer.bitpacked().cpu()
        tensors[f"{name}.scales_and_zeros"] = layer.scales_and_zeros.cpu()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.cpu()
        shapes[name] = [layer.out_features, layer.in_features, layer.bits, layer.group_size]
    metadata = {"meta": _meta_json(meta), "layers": json.dumps(shapes, sort_keys=True)}
    metadata["checksum"] = _checksum(metadata, tensors)
    with atomic_output(Path(path)) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_quantized(
    path: str | os.PathLike, expected_meta: dict, device: str | torch.device = "cpu"
) -> dict[str, QuantLinear] | None:
    """Load layers written by ``save_quantized`` onto ``device``.

    Returns None when the file is missing, unreadable, truncated, corrupted (checksum
    mismatch) or was written for other meta, format or quantizer: rebuild then. Every
    reason but a missing file is logged as a warning. Other errors (bugs) propagate.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return _load(path, expected_meta, torch.device(device))
    except (SubspecError, OSError, ValueError, KeyError) as exc:
        log.warning("rebuilding %s: the cached file is unusable (%s)", path, exc)
        return None
    finally:
        release_free_memory()  # the file's bytes and unpacked values, freed but kept by malloc


def _load(path: Path, expected_meta: dict, device: torch.device) -> dict[str, QuantLinear] | None:
    with SafetensorsFile(path) as f:  # read, not mapped: only the tensors count in RSS
        metadata = f.metadata
        if metadata.get("meta") != _meta_json(expected_meta):
            log.warning("rebuilding %s: it was built for other settings", path)
            return None
        tensors = {key: f.get(key) for key in f.keys()}
    if metadata["checksum"] != _checksum(metadata, tensors):
        raise ValueError("checksum mismatch")
    layers = {}
    for name, (_, in_f, bits, group_size) in json.loads(metadata["layers"]).items():
        q = Bitpacked(tensors.pop(f"{name}.qweight").to(device), bits, in_f)
        sz = tensors[f"{name}.scales_and_zeros"].to(device)
        bias = tensors.get(f"{name}.bias")
        bias = None if bias is None else bias.to(device)
        layers[name] = QuantLinear(q, sz, bias, bits=bits, group_size=group_size)
    return layers


def _meta_json(meta: dict) -> str:
    full = {**meta, "format_version": FORMAT_VERSION, "quantizer": QUANTIZER}
    return json.dumps(full, sort_keys=True)


def _checksum(metadata: dict[str, str], tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256(f"{metadata['meta']}\0{metadata['layers']}".encode())
    for key in sorted(tensors):
        t = tensors[key]
        digest.update(f"\0{key}\0{t.dtype}\0{list(t.shape)}\0".encode())
        digest.update(t.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()

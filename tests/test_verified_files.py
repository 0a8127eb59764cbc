"""Streamed files are verified: each carries the CRC-32 of its data, checked the first time a
store reads it; a corrupted file is logged, written anew from its source and read again, and
decoding goes on with the model's own weights."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from helpers import generate, make_runtime, minimum_budget

from subspec.errors import SubspecError
from subspec.offload.layer_file import MAGIC, layer_path, read_manifest, write_layer_file
from subspec.offload.stores import DiskStore, aligned_empty
from subspec.runtime.weights import ensure_files


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 96, generator=g).bfloat16(), "b": torch.randn(64, generator=g)}


def _flip_byte(path, at: int) -> None:
    """Invert one byte of the file's data region, `at` bytes into it."""
    manifest = read_manifest(path)
    with open(path, "r+b") as f:
        f.seek(manifest.data_offset + at)
        byte = f.read(1)
        f.seek(manifest.data_offset + at)
        f.write(bytes([byte[0] ^ 0xFF]))


def _read(store: DiskStore, unit: int) -> torch.Tensor:
    dst = aligned_empty(store.nbytes(unit))
    store.read_into(unit, dst)
    return dst.clone()


def test_a_flipped_byte_is_found_and_the_file_rebuilt(tmp_path, caplog):
    sources = {u: (lambda u=u: _tensors(u)) for u in range(3)}
    manifests = ensure_files(tmp_path, sources, "writing", None)
    want = {u: _read(DiskStore(tmp_path, manifests, io_threads=1), u) for u in manifests}
    _flip_byte(layer_path(tmp_path, 1), 100)
    rebuilt = []

    def rebuild(unit: int):
        rebuilt.append(unit)
        return write_layer_file(layer_path(tmp_path, unit), sources[unit]())

    store = DiskStore(tmp_path, manifests, io_threads=1, rebuild=rebuild)
    with caplog.at_level(logging.WARNING):
        got = {u: _read(store, u) for u in manifests}
    assert rebuilt == [1] and "CRC-32" in caplog.text and "layer_00001" in caplog.text
    assert all(torch.equal(got[u], want[u]) for u in manifests)
    assert torch.equal(_read(DiskStore(tmp_path, store.manifests), 1), want[1])  # fixed on disk


def test_without_a_source_a_corrupted_file_is_an_error(tmp_path):
    manifest = write_layer_file(layer_path(tmp_path, 0), _tensors(0))
    _flip_byte(layer_path(tmp_path, 0), manifest.total_bytes - 1)  # the zero padding too
    with pytest.raises(SubspecError, match="checksum mismatch"):
        _read(DiskStore(tmp_path, {0: manifest}), 0)


def test_a_file_without_a_checksum_is_written_anew(tmp_path):
    """A layer file of the format before checksums: its header lacks crc32."""
    path = layer_path(tmp_path, 0)
    write_layer_file(path, _tensors(0))
    raw = bytearray(path.read_bytes())
    length = int.from_bytes(raw[len(MAGIC) : len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8
    header = json.loads(raw[start : start + length])
    header["crc32"] = None
    body = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    raw[start : start + length] = body
    path.write_bytes(bytes(raw))
    with pytest.raises(SubspecError, match="older format"):
        read_manifest(path)
    manifests = ensure_files(tmp_path, {0: lambda: _tensors(0)}, "writing", None)
    assert read_manifest(path) == manifests[0] and manifests[0].crc32 is not None


@pytest.mark.parametrize("plain", [False, True], ids=["residual-form", "whole-layers"])
def test_a_corrupted_streamed_layer_still_decodes_the_models_tokens(tiny_model_dir, plain,
                                                                     caplog):  # fmt: skip
    """A byte flipped in a streamed layer's file (in residual form, or whole): the next
    runtime finds it on its first read, rebuilds it, and decodes the reference's tokens."""
    from subspec.config import SpecConfig

    methods = ("vanilla", "subspec")
    spec = SpecConfig(residual_stream=not plain)
    budget = minimum_budget(tiny_model_dir, methods, "bfloat16", spec)
    reference = make_runtime(tiny_model_dir, methods, None, "bfloat16", spec)
    want = generate(reference, "vanilla", "hello world", 12)[0]
    first = make_runtime(tiny_model_dir, methods, budget, "bfloat16", spec)
    store = first.streaming.prefetcher.store
    unit = min(store.manifests)
    path = store.path(unit)
    first.close()
    _flip_byte(path, os.path.getsize(path) // 3 - read_manifest(path).data_offset)
    runtime = make_runtime(tiny_model_dir, methods, budget, "bfloat16", spec)
    try:
        with caplog.at_level(logging.WARNING):
            got = generate(runtime, "subspec", "hello world", 12)[0]
        assert got == want
        assert f"layer_{unit:05d}" in caplog.text and "CRC-32" in caplog.text
        assert unit in runtime.streaming.prefetcher.store.verified
    finally:
        runtime.close()

"""Reading a Hugging Face safetensors checkpoint into subspec's fused layer layout."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .errors import SubspecError

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class Checkpoint:
    """The tensors of a checkpoint directory, by Hugging Face name, read lazily."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.file_of = self._index(model_dir)  # tensor name -> file path
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _index(model_dir: Path) -> dict[str, Path]:
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise SubspecError(f"malformed {index}: {e!r}") from None
            return {name: model_dir / f for name, f in weight_map.items()}
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise SubspecError(f"no *.safetensors files in {model_dir}")
        file_of = {}
        for f in files:
            for name in _header(f):
                file_of[name] = f
        return file_of

    def has(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor, converted to dtype, in ordinary (non-mapped) memory."""
        path = self.file_of.get(name)
        if path is None:
            raise SubspecError(f"checkpoint {self.model_dir} has no tensor {name}")
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="pt")
            t = self._handles[path].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise SubspecError(f"corrupted or truncated checkpoint file {path}: {e}") from None
        return t.to(dtype=dtype, copy=True).contiguous()

    def rows(self, name: str) -> tuple[np.memmap, torch.dtype]:
        """A read-only memory map of a 2-D tensor (for embedding rows read on demand)."""
        path = self.file_of[name]
        header_len, header = _raw_header(path)
        info = header[name]
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        np_dtype = {torch.bfloat16: np.uint16, torch.float16: np.float16}.get(dtype, np.float32)
        arr = np.memmap(
            path,
            dtype=np_dtype,
            mode="r",
            offset=8 + header_len + start,
            shape=tuple(info["shape"]),
        )
        if arr.nbytes != end - start:
            raise SubspecError(f"corrupted checkpoint file {path}: bad offsets for {name}")
        return arr, dtype

    def close(self) -> None:
        """Drop the file handles (and their memory maps)."""
        self._handles.clear()


def _raw_header(path: Path) -> tuple[int, dict]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, ValueError, struct.error) as e:
        raise SubspecError(f"corrupted or unreadable checkpoint file {path}: {e}") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                   default=0)  # fmt: skip
    if 8 + n + data_end > size:
        raise SubspecError(f"truncated checkpoint file {path}: {size} bytes, header needs more")
    return n, header


def _header(path: Path) -> list[str]:
    return [k for k in _raw_header(path)[1] if k != "__metadata__"]


def layer_tensors(ckpt: Checkpoint, cfg: ModelConfig, i: int, dtype) -> dict[str, torch.Tensor]:
    """Layer i in the fused layout of layers.py (qkv and gate_up concatenated on dim 0)."""
    p = f"model.layers.{i}."

    def get(name: str) -> torch.Tensor:
        return ckpt.get(p + name, dtype)

    t = {
        "attn_norm": get("input_layernorm.weight"),
        "mlp_norm": get("post_attention_layernorm.weight"),
        "qkv.weight": torch.cat([get(f"self_attn.{x}_proj.weight") for x in "qkv"]),
        "o.weight": get("self_attn.o_proj.weight"),
        "gate_up.weight": torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]),
        "down.weight": get("mlp.down_proj.weight"),
    }
    if cfg.qkv_bias:
        t["qkv.bias"] = torch.cat([get(f"self_attn.{x}_proj.bias") for x in "qkv"])
    if cfg.qk_norm:
        t["q_norm"] = get("self_attn.q_norm.weight")
        t["k_norm"] = get("self_attn.k_norm.weight")
    _check_shapes(t, cfg, i)
    return t


def _check_shapes(t: dict[str, torch.Tensor], cfg: ModelConfig, i: int) -> None:
    expected = {f"{name}.weight": shape for name, shape in cfg.linear_shapes.items()}
    expected["attn_norm"] = (cfg.hidden_size,)
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise SubspecError(
                f"layer {i} tensor {name} has shape {tuple(t[name].shape)}, config implies {shape}"
            )


def lm_head_name(ckpt: Checkpoint, cfg: ModelConfig) -> str:
    """The tensor used as output projection (tied embeddings when there is no lm_head)."""
    if not cfg.tie_word_embeddings and ckpt.has("lm_head.weight"):
        return "lm_head.weight"
    return "model.embed_tokens.weight"

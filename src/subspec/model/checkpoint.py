"""Reading a Hugging Face safetensors checkpoint into subspec's fused layer layout.

Opening a checkpoint reads its headers only and imports no torch (`subspec plan` sizes models
from them); torch is imported when a tensor is first read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from subspec.errors import SubspecError
from subspec.files import SAFETENSORS_DTYPES, SafetensorsFile, read_safetensors_header
from subspec.model.config import ModelConfig

if TYPE_CHECKING:
    import torch


# Hugging Face tensor names, the same in every supported family (Llama, Mistral, Qwen2, Qwen3).
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
# subspec's fused layer layout -> the tensors of `model.layers.{i}.` it concatenates (dim 0);
# entries marked with a feature exist only in configs that have it.
LAYER_TABLE: dict[str, tuple[tuple[str, ...], str | None]] = {
    "attn_norm": (("input_layernorm.weight",), None),
    "mlp_norm": (("post_attention_layernorm.weight",), None),
    "qkv.weight": (tuple(f"self_attn.{x}_proj.weight" for x in "qkv"), None),
    "qkv.bias": (tuple(f"self_attn.{x}_proj.bias" for x in "qkv"), "qkv_bias"),
    "o.weight": (("self_attn.o_proj.weight",), None),
    "gate_up.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), None),
    "down.weight": (("mlp.down_proj.weight",), None),
    "q_norm": (("self_attn.q_norm.weight",), "qk_norm"),
    "k_norm": (("self_attn.k_norm.weight",), "qk_norm"),
}
NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm")


def layer_names(cfg: ModelConfig, i: int) -> dict[str, tuple[str, ...]]:
    """Fused name -> the checkpoint tensors it is made of, for layer i of this config."""
    return {
        name: tuple(f"model.layers.{i}.{s}" for s in sources)
        for name, (sources, feature) in LAYER_TABLE.items()
        if feature is None or getattr(cfg, feature)
    }


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
            for name in read_safetensors_header(f)[1]:
                if name != "__metadata__":
                    file_of[name] = f
        return file_of

    def has(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor, converted to dtype, in a tensor of its own (read, not mapped)."""
        return self.get_rows(name, 0, None, dtype)

    def get_rows(self, name: str, start: int, end: int | None, dtype) -> torch.Tensor:
        """Rows [start, end) of a tensor (to its end for None), converted to dtype: only they
        are read (the LM head quantized or written in chunks is never whole in memory)."""
        path = self.file_of.get(name)
        if path is None:
            raise SubspecError(f"checkpoint {self.model_dir} has no tensor {name}")
        try:
            if path not in self._handles:
                self._handles[path] = SafetensorsFile(path)
            t = self._handles[path].get_rows(name, start, end)
        except (OSError, KeyError, SubspecError) as e:
            raise SubspecError(f"corrupted or truncated checkpoint file {path}: {e}") from None
        return t if t.dtype == dtype else t.to(dtype)

    def rows(self, name: str) -> tuple[np.memmap, torch.dtype]:
        """A read-only memory map of a 2-D tensor (for embedding rows read on demand)."""
        path = self.file_of[name]
        header_len, header = read_safetensors_header(path)
        info = header[name]
        start, end = info["data_offsets"]
        import torch

        dtype = getattr(torch, SAFETENSORS_DTYPES[info["dtype"]])
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
        """Close the file handles."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def layer_tensors(ckpt: Checkpoint, cfg: ModelConfig, i: int, dtype) -> dict[str, torch.Tensor]:
    """Layer i in the fused layout of layers.py (qkv and gate_up concatenated on dim 0)."""
    import torch

    t = {
        name: torch.cat([ckpt.get(hf, dtype) for hf in sources])
        for name, sources in layer_names(cfg, i).items()
    }
    _check_shapes(t, cfg, i)
    return t


def layer_norms(ckpt: Checkpoint, cfg: ModelConfig, i: int, dtype) -> dict[str, torch.Tensor]:
    """The full-precision vectors of layer i (norms, no linear weights): what a substitute
    layer keeps beside its low-bit linears."""
    names = layer_names(cfg, i)
    return {name: ckpt.get(names[name][0], dtype) for name in NORMS if name in names}


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
    if not cfg.tie_word_embeddings and ckpt.has(LM_HEAD):
        return LM_HEAD
    return EMBED

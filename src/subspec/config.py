"""Configuration dataclasses: the model architecture, sampling and speculation settings."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SubspecError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family decoder, read from a Hugging Face config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 family, or Llama/Mistral with attention_bias
    qk_norm: bool  # Qwen3: RMSNorm on each head of q and k before RoPE
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise SubspecError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )

    @property
    def qkv_out(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each fused linear map of a layer (see layers.LINEAR_NAMES)."""
        h, f = self.hidden_size, self.intermediate_size
        return {
            "qkv": (self.qkv_out, h),
            "o": (h, self.num_heads * self.head_dim),
            "gate_up": (2 * f, h),
            "down": (h, f),
        }

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """Read config.json (and generation_config.json for extra EOS ids)."""
        raw = _read_json(model_dir / "config.json")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise SubspecError(
                f"unsupported architecture {model_type!r} in {model_dir / 'config.json'}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            return cls._from_raw(raw, model_type, _eos_ids(model_dir, raw))
        except (KeyError, TypeError, ValueError) as e:
            raise SubspecError(f"malformed {model_dir / 'config.json'}: {e!r}") from None

    @classmethod
    def _from_raw(cls, raw: dict, model_type: str, eos: tuple[int, ...]) -> ModelConfig:
        _check_rope_scaling(raw)
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        rope = raw.get("rope_parameters") or {}
        return cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            eos_token_ids=eos,
        )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SubspecError(f"missing {path}") from None
    except (OSError, ValueError) as e:
        raise SubspecError(f"unreadable {path}: {e}") from None


def _check_rope_scaling(raw: dict) -> None:
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", None):
        raise SubspecError(f"unsupported rope scaling {kind!r}; only plain RoPE is implemented")


def _eos_ids(model_dir: Path, raw: dict) -> tuple[int, ...]:
    ids: list[int] = []
    sources = [raw]
    gen = model_dir / "generation_config.json"
    if gen.exists():
        sources.append(_read_json(gen))
    for src in sources:
        eos = src.get("eos_token_id")
        for t in eos if isinstance(eos, list) else [eos]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return tuple(ids)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature == 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SubspecError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SubspecError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SubspecError(f"top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SpecConfig:
    """Tree drafting settings (see DESIGN.md: D, k, T_d)."""

    # CPU defaults, chosen by measurement (README): the paper's GPU shape is D=48, k=6
    depth: int = 16
    width: int = 2
    draft_temperature: float = 0.2
    verify_nodes: int = 0  # verify only the best-scoring nodes of the drafted tree (0 = all)
    bits: int = 4  # 16: full-precision copies (a draft identical to the target, for tests)
    group_size: int = 64
    head_bits: int = 4  # the draft's LM head: a low-bit substitute, or 16 to share the target's
    hqq_optimize: bool = (
        True  # HQQ's half-quadratic solver; False = plain min-max rounding, ~20x faster
    )

    def __post_init__(self) -> None:
        if self.depth < 1 or self.width < 1:
            raise SubspecError(f"depth and width must be >= 1, got {self.depth}, {self.width}")
        if self.verify_nodes < 0:
            raise SubspecError(f"verify nodes must be >= 0, got {self.verify_nodes}")
        if not self.draft_temperature > 0:
            raise SubspecError(f"draft temperature must be > 0, got {self.draft_temperature}")
        if self.bits not in (2, 3, 4, 8, 16):
            raise SubspecError(f"bits must be one of 2, 3, 4, 8, 16, got {self.bits}")
        if self.head_bits not in (4, 8, 16):
            raise SubspecError(f"draft head bits must be 4, 8 or 16, got {self.head_bits}")

    @property
    def tree_size(self) -> int:
        return 1 + self.depth * self.width


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9,
}  # fmt: skip


def parse_size(text: str) -> int:
    """Parse a byte size such as '1.2GB', '900MiB' or '123456' into bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and _SIZE_UNITS.get(m.group(2).lower())
    if not m or unit is None:
        raise SubspecError(f"cannot parse size {text!r}; use e.g. 1.2GB, 900MiB or a byte count")
    return int(float(m.group(1)) * unit)


def format_size(n: float) -> str:
    """Human-readable bytes, e.g. 1.23 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"

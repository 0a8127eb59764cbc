"""The architecture of a decoder, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from subspec.errors import SubspecError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


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
    # attention reaches this many tokens back where the model says so (Mistral v0.1): the
    # forward attends to every cached token, so the context is held within it
    sliding_window: int | None = None

    @property
    def longest_context(self) -> int:
        """The most tokens this forward computes as the model does."""
        return min(self.max_position_embeddings, self.sliding_window or 1 << 62)

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
            sliding_window=_sliding_window(raw, model_type),
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


def _sliding_window(raw: dict, model_type: str) -> int | None:
    """The attention window the model was trained with, where it applies: Mistral's
    `sliding_window` (v0.1: 4096; null from v0.2), Qwen2's only with `use_sliding_window`."""
    window = raw.get("sliding_window")
    applies = model_type == "mistral" or bool(raw.get("use_sliding_window"))
    return int(window) if applies and window else None


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

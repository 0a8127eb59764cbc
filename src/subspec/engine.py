"""The engine: a target model placed under a memory budget, and the drafts that serve it.

One engine for every device: `device` is where compute happens (the fast tier), and the
slow tier is disk on a CPU machine or pinned host RAM on a CUDA machine.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import hub, quant
from .checkpoint import Checkpoint, lm_head_name
from .config import DTYPES, ModelConfig, SamplingConfig, SpecConfig
from .decoding import DecodeStats, prefill, speculative, vanilla
from .errors import SubspecError
from .kv_cache import KVCache
from .layers import LayerSource, dense, widen_scratch_bytes
from .memory import current_rss_bytes, release_free_memory
from .model import Embedding, Model
from .offload.layer_file import layer_path, tensors_from_buffer
from .offload.prefetch import Prefetcher
from .offload.stores import DiskStore, PinnedHostStore
from .planner import ModelSizes, Placement, plan
from .tokenizer import encode, load_tokenizer
from .weights import (
    StreamedHead,
    StreamedLayers,
    ensure_head_files,
    ensure_layer_files,
    fingerprint,
    layer_nbytes,
    load_draft_head,
    load_resident,
    load_substitutes,
    substitute_nbytes,
)

METHODS = ("vanilla", "subspec", "classic")


@dataclass(frozen=True)
class EngineConfig:
    """What to load and under which budget."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "bfloat16"
    device: str = "cpu"
    memory_budget: int | None = None  # bytes of fast memory; None = no limit
    context: int = 4096  # committed tokens the KV cache holds (prompt + output)
    methods: tuple[str, ...] = ("vanilla",)  # which drafts to prepare
    spec: SpecConfig = field(default_factory=SpecConfig)
    draft_model: str | None = None  # classic speculation's draft
    prefill_chunk: int = 512
    n_buffers: int = 2
    map_embeddings: bool = False  # read embedding rows from the checkpoint even when all fits

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SubspecError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise SubspecError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if "classic" in self.methods and not self.draft_model:
            raise SubspecError("method classic needs --draft-model")
        if self.context < 16:
            raise SubspecError(f"context must be >= 16 tokens, got {self.context}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SubspecError(f"device {self.device} requested but CUDA is not available")


class Target:
    """A model with its layer source and cache: `forward` is one pass over all layers."""

    def __init__(self, model: Model, layers: LayerSource, cache: KVCache):
        self.model, self.layers, self.cache = model, layers, cache
        self.device = model.device

    def forward(self, tokens, positions, slots, mask, kv_len) -> torch.Tensor:
        return self.model.forward(self.layers, self.cache, tokens, positions, slots, mask, kv_len)


class SharedDrafter:
    """SubSpec's draft: the target's model and cache, substitutes in place of streamed layers."""

    def __init__(self, target: Target, layers: LayerSource, lm_head=None):
        self.target, self.layers = target, layers
        self.lm_head = lm_head  # a low-bit substitute, or None to share the target's

    def prefill(self, prompt, chunk) -> None:
        """Nothing to do: the draft reads the prefix KV the target wrote."""

    def step(self, tokens, positions, slots, mask, kv_len) -> torch.Tensor:
        t = self.target
        hidden = t.model.forward(self.layers, t.cache, tokens, positions, slots, mask, kv_len)
        return t.model.logits(hidden, self.lm_head)

    def commit(self, src_slots, dst_start) -> None:
        """Nothing to do: compacting the shared cache moved the accepted slots."""


class ModelDrafter:
    """Classic speculation's draft: a separate, smaller model with its own cache."""

    def __init__(self, target: Target):
        self.target = target

    def prefill(self, prompt, chunk) -> None:
        prefill(self.target, prompt, chunk)

    def step(self, tokens, positions, slots, mask, kv_len) -> torch.Tensor:
        return self.target.model.logits(self.target.forward(tokens, positions, slots, mask, kv_len))

    def commit(self, src_slots, dst_start) -> None:
        self.target.cache.compact(src_slots, dst_start)
        self.target.cache.length = dst_start + src_slots.numel()


class Engine:
    """Loads a model under a placement and decodes with any of METHODS."""

    def __init__(self, cfg: EngineConfig, progress: bool = True):
        self.cfg = cfg
        self.dtype, self.device = DTYPES[cfg.dtype], torch.device(cfg.device)
        self.model_dir = hub.resolve_model(cfg.model, progress=progress)
        self.model_cfg = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.rss_before_load = current_rss_bytes()  # fixed overhead: torch, tokenizer, ...
        self.eos_ids = set(self.model_cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.capacity = cfg.context + cfg.spec.tree_size
        self._draft_model_bytes = 0
        self.classic = self._load_classic(progress) if "classic" in cfg.methods else None
        with _progress(progress) as bar:
            self._load_target(bar)
        release_free_memory()

    # ---- loading ----------------------------------------------------------------------------

    def _sizes(self) -> ModelSizes:
        m, dt = self.model_cfg, self.dtype
        item = torch.empty((), dtype=dt).element_size()
        spec = self.cfg.spec
        sub = "subspec" in self.cfg.methods
        table = m.vocab_size * m.hidden_size * item  # embeddings or LM head
        largest = max(m.vocab_size * m.hidden_size, *(o * i for o, i in m.linear_shapes.values()))
        return ModelSizes(
            num_layers=m.num_layers,
            layer_bytes=layer_nbytes(m, dt),
            substitute_bytes=substitute_nbytes(m, spec.bits, spec.group_size, dt) if sub else 0,
            embed_bytes=0 if self.cfg.map_embeddings and not self._tied else table,
            lm_head_bytes=0 if self._tied else table,
            norm_bytes=m.hidden_size * item,
            kv_bytes=KVCache.nbytes_for(
                m.num_layers, m.num_kv_heads, m.head_dim, self.capacity, dt
            ),
            extra_bytes=self._draft_model_bytes,
            draft_head_bytes=self._draft_head_bytes() if sub else 0,
            scratch_bytes=widen_scratch_bytes(dt, self.device, largest),
            head_can_stream=not (sub and spec.head_bits == 16),
        )

    def _draft_head_bytes(self) -> int:
        m, spec = self.model_cfg, self.cfg.spec
        if spec.head_bits == 16:
            return 0
        return quant.quantized_nbytes(m.vocab_size, m.hidden_size, spec.head_bits,
                                      spec.group_size, compute_dtype=self.dtype)  # fmt: skip

    def _load_target(self, bar: Progress) -> None:
        ckpt = Checkpoint(self.model_dir)
        m = self.model_cfg
        self._tied = lm_head_name(ckpt, m) == "model.embed_tokens.weight"
        # layer files and substitutes of this checkpoint at this dtype
        self.cache_dir = hub.cache_root() / "offload" / f"{fingerprint(ckpt)}-{self.cfg.dtype}"
        self.placement: Placement = plan(self._sizes(), self.cfg.memory_budget, self.cfg.n_buffers)
        p = self.placement
        # the full LM head [V, H], read from the checkpoint at most once: to keep it resident,
        # or to build its chunk files or the draft's low-bit copy when those are not cached
        load_head = functools.cache(functools.partial(ckpt.get, lm_head_name(ckpt, m), self.dtype))
        resident = load_resident(ckpt, m, p.resident_layers, self.dtype, self.device)
        self.streamed, streamed_head = None, None
        if p.streamed_layers:
            self.streamed, streamed_head = self._stream(ckpt, load_head, bar)
        lm_head = load_head().to(self.device) if p.lm_head_resident else None
        final_norm = ckpt.get("model.norm.weight", self.dtype).to(self.device)
        embed = self._embedding(ckpt, lm_head)
        head = dense(lm_head) if p.lm_head_resident else streamed_head
        self.model = Model(m, embed, final_norm, head, self.dtype, self.device, self.capacity)
        cache = KVCache(
            m.num_layers, m.num_kv_heads, m.head_dim, self.capacity, self.dtype, self.device
        )
        self.target = Target(self.model, LayerSource(resident, m.num_layers, self.streamed), cache)
        self.subspec = None
        if "subspec" in self.cfg.methods:
            subs = self._substitutes(ckpt, bar) if p.streamed_layers else {}
            head = self._draft_head(load_head, bar) if p.streamed_layers else None
            layers = LayerSource({**resident, **subs}, m.num_layers)
            self.subspec = SharedDrafter(self.target, layers, head)
        ckpt.close()

    def _embedding(self, ckpt: Checkpoint, lm_head: torch.Tensor | None) -> Embedding:
        if self._tied and self.placement.lm_head_resident:
            return Embedding(weight=lm_head)
        if self.placement.embed_resident and not self.cfg.map_embeddings:
            return Embedding(
                weight=ckpt.get("model.embed_tokens.weight", self.dtype).to(self.device)
            )
        return Embedding(
            mapped=ckpt.rows("model.embed_tokens.weight"), dtype=self.dtype, device=self.device
        )

    def _stream(self, ckpt: Checkpoint, load_head, bar: Progress):
        """Layer files (and LM head chunks when the head streams) and their prefetcher, which
        reads them in the order a forward pass and its logits consume them. Returns the
        streamed layers and the streamed LM head (None when the head is resident)."""
        m, layers = self.model_cfg, self.placement.streamed_layers
        directory = self.cache_dir / "layers"
        manifests = ensure_layer_files(ckpt, m, layers, self.dtype, directory, bar)
        head_units = []
        if not self.placement.lm_head_resident:
            head = ensure_head_files(load_head, m, self.dtype, m.num_layers, directory, bar)
            manifests |= head
            head_units = list(head)
        units = layers + head_units
        if self.device.type == "cpu":
            store = DiskStore(directory, manifests)
        else:
            store = PinnedHostStore({i: _read_layer(directory, i, manifests[i]) for i in units})
        self.prefetcher = Prefetcher(store, units, self.cfg.n_buffers, self.device)
        self.store_mode = getattr(store, "mode", "pinned-host")
        streamed = StreamedLayers(self.prefetcher, manifests)
        return streamed, StreamedHead(streamed, head_units) if head_units else None

    def _substitutes(self, ckpt: Checkpoint, bar: Progress):
        spec = self.cfg.spec
        path = self.cache_dir / f"substitutes-{self._quant_tag(spec.bits)}"
        return load_substitutes(
            ckpt, self.model_cfg, self.placement.streamed_layers, self.dtype, self.device,
            spec, path, bar,
        )  # fmt: skip

    def _draft_head(self, load_head, bar: Progress):
        spec, m = self.cfg.spec, self.model_cfg
        if spec.head_bits == 16:
            return None  # share the target's head
        path = self.cache_dir / f"draft-head-{self._quant_tag(spec.head_bits)}.safetensors"
        shape = (m.vocab_size, m.hidden_size)
        return load_draft_head(load_head, shape, self.dtype, self.device, spec, path, bar)

    def _quant_tag(self, bits: int) -> str:
        spec = self.cfg.spec
        return f"b{bits}-g{spec.group_size}-{'hqq' if spec.hqq_optimize else 'rtn'}"

    def _load_classic(self, progress: bool) -> ModelDrafter:
        draft_cfg = EngineConfig(
            model=self.cfg.draft_model, dtype=self.cfg.dtype, device=self.cfg.device,
            context=self.cfg.context, spec=self.cfg.spec, methods=("vanilla",),
            map_embeddings=True,  # the draft's embedding rows need not take budget either
        )  # fmt: skip
        draft = Engine(draft_cfg, progress=progress)
        if draft.model_cfg.vocab_size != self.model_cfg.vocab_size:
            raise SubspecError(
                f"draft model {self.cfg.draft_model} has vocabulary {draft.model_cfg.vocab_size}, "
                f"the target {self.model_cfg.vocab_size}: they must share a tokenizer"
            )
        self._draft_model_bytes = draft.placement.resident_bytes
        return ModelDrafter(draft.target)

    # ---- decoding ---------------------------------------------------------------------------

    def check_fits(self, prompt_len: int, max_new_tokens: int, method: str) -> None:
        """Refuse a request that would overflow the KV cache."""
        if method not in METHODS or (method != "vanilla" and self._drafter(method) is None):
            ready = [m for m in METHODS if m == "vanilla" or self._drafter(m) is not None]
            raise SubspecError(f"method {method!r} is not loaded; available: {', '.join(ready)}")
        if prompt_len < 1:
            raise SubspecError("the prompt is empty")
        if prompt_len + max_new_tokens > self.cfg.context:
            raise SubspecError(
                f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the "
                f"context of {self.cfg.context} tokens (raise --context)"
            )

    def _drafter(self, method: str):
        return {"subspec": self.subspec, "classic": self.classic}.get(method)

    def close(self) -> None:
        """Stop the prefetcher's threads and close the slow tier's files."""
        if self.streamed is not None:
            self.prefetcher.close()
            self.prefetcher.store.close()

    def reset(self) -> None:
        """Forget the previous request's cache and counters."""
        self.target.cache.length = 0
        if self.classic is not None:
            self.classic.target.cache.length = 0
        if self.streamed is not None:
            self.streamed.bytes_used = 0
            self.prefetcher.reset_stats()

    def decode(self, method, prompt, sampling: SamplingConfig, gen, stats: DecodeStats):
        """The token stream of one method (see decoding.py)."""
        chunk = self.cfg.prefill_chunk
        if method == "vanilla":
            return vanilla(self.target, prompt, sampling, gen, stats, chunk)
        drafter = self._drafter(method)
        return speculative(self.target, drafter, prompt, sampling, self.cfg.spec, gen, stats, chunk)

    def stream_stats(self) -> dict:
        """Memory and transfer figures for the stats record."""
        p = self.placement
        return {
            "bytes_streamed": self.streamed.bytes_used if self.streamed else 0,
            "transfer_wait_s": round(self.prefetcher.stats.wait_s, 4) if self.streamed else 0.0,
            "memory_budget_bytes": p.budget_bytes,
            "resident_bytes": p.resident_bytes,
            "rss_before_load_bytes": self.rss_before_load,
            "placement": p.to_dict(),
        }

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        """Token ids of a prompt, through the model's chat template when `chat`."""
        return encode(self.tokenizer, prompt, chat)


def _read_layer(directory: Path, i: int, manifest) -> dict[str, torch.Tensor]:
    data = torch.from_file(
        str(layer_path(directory, i)), size=manifest.file_bytes, dtype=torch.uint8
    )
    return tensors_from_buffer(data[manifest.data_offset :].clone(), manifest)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=Console(file=sys.stderr), disable=not enabled, transient=True,
    )  # fmt: skip

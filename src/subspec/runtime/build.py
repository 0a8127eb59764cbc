"""Building a runtime: resolve the model, size it, plan the placement, prepare the caches
(layer files, substitutes) and load. Config in, runtime out.

One builder for every device: `device` is where compute happens (the fast tier), and the
slow tier is disk on a CPU machine or pinned host RAM on a CUDA machine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from rich.progress import Progress

from subspec import quant
from subspec.config import DEFAULT_CONTEXT, METHODS, RuntimeConfig, format_size, methods_to_load
from subspec.errors import SubspecError
from subspec.files import cache_root
from subspec.hub.models import resolve_model
from subspec.memory import (
    available_bytes,
    current_rss_bytes,
    fast_memory_budget,
    release_free_memory,
)
from subspec.model.checkpoint import EMBED, FINAL_NORM, Checkpoint, lm_head_name
from subspec.model.config import ModelConfig
from subspec.model.forward import Embedding, Model
from subspec.model.kv_cache import KVCache
from subspec.model.layers import LayerSource, dense, widen_scratch_bytes
from subspec.model.placed import PlacedModel
from subspec.model.tokenizer import load_tokenizer
from subspec.offload.planner import ModelSizes, Placement, minimum_parts, plan
from subspec.offload.prefetch import Prefetcher
from subspec.offload.stores import DiskStore, PinnedHostStore, SlowStore
from subspec.offload.streamed import StreamedHead, StreamedLayers
from subspec.progress import progress_bars
from subspec.runtime.runtime import Runtime, Streaming
from subspec.runtime.weights import (
    ensure_files,
    fingerprint,
    head_sources,
    layer_nbytes,
    layer_sources,
    load_draft_head,
    load_resident,
    load_substitutes,
    substitute_nbytes,
    workspace_nbytes,
)
from subspec.spec.drafters import ModelDrafter, SharedDrafter


def build_runtime(cfg: RuntimeConfig, progress: bool = True) -> Runtime:
    """Load cfg.model under cfg.memory_budget with the drafts for cfg.methods."""
    model_dir = resolve_model(cfg.model, progress=progress)
    model_cfg = ModelConfig.from_dir(model_dir)
    cfg = resolve_context(cfg, model_cfg)
    tokenizer = load_tokenizer(model_dir)
    rss_before_load = current_rss_bytes()  # fixed overhead: torch, tokenizer, ...
    with Checkpoint(model_dir) as ckpt:  # headers only: refuse an impossible plan before loading
        plan_checked(cfg, ckpt, model_cfg, _draft_bytes(cfg, model_cfg))
    classic = _classic_draft(cfg, model_cfg, progress) if "classic" in cfg.methods else None
    extra = classic.placement.resident_bytes if classic else 0
    with progress_bars(progress) as bars, Checkpoint(model_dir) as ckpt:
        loaded = Builder(cfg, ckpt, model_cfg, bars).load(extra_bytes=extra)
    release_free_memory()
    drafters = {}
    if loaded.shared_drafter is not None:
        drafters["subspec"] = loaded.shared_drafter
    if classic is not None:
        drafters["classic"] = ModelDrafter(classic.model)
    return Runtime(
        cfg=cfg, model_cfg=model_cfg, tokenizer=tokenizer,
        eos_ids=_eos_ids(model_cfg, tokenizer), placement=loaded.placement,
        target=loaded.model, streaming=loaded.streaming, rss_before_load=rss_before_load,
        drafters=drafters,
    )  # fmt: skip


def resolve_context(cfg: RuntimeConfig, model_cfg: ModelConfig) -> RuntimeConfig:
    """cfg with its context settled: DEFAULT_CONTEXT capped at the model's
    max_position_embeddings when unset; a context above that maximum is refused."""
    most = model_cfg.max_position_embeddings
    if cfg.context is None:
        return replace(cfg, context=min(DEFAULT_CONTEXT, most))
    if cfg.context > most:
        raise SubspecError(
            f"--context {cfg.context} is above the model's max_position_embeddings of {most}"
        )
    return cfg


def plan_checked(cfg: RuntimeConfig, ckpt: Checkpoint, model_cfg: ModelConfig,
                 extra_bytes: int = 0) -> Placement:  # fmt: skip
    """The placement for cfg, from headers only (no weight is read), refusing a KV cache
    that cannot fit in free memory and a budget below the minimum (naming each method's)."""
    sizes = Builder(cfg, ckpt, model_cfg, None).sizes(extra_bytes)
    check_kv_fits(cfg, sizes)
    try:
        return plan(sizes, cfg.memory_budget, cfg.n_buffers)
    except SubspecError as e:
        mins = method_minimums(cfg, ckpt, model_cfg)
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
                 method: str) -> ModelSizes:  # fmt: skip
    """The sizes of a runtime that runs `method` (its draft included), from headers only."""
    m_cfg = replace(cfg, methods=methods_to_load(method))
    return Builder(m_cfg, ckpt, model_cfg, None).sizes(_draft_bytes(m_cfg, model_cfg))


def method_minimums(cfg: RuntimeConfig, ckpt: Checkpoint, model_cfg: ModelConfig) -> dict:
    """Method -> the smallest budget it runs in (classic only with a draft model)."""
    out = {}
    for method in METHODS:
        if method == "classic" and not cfg.draft_model:
            continue
        sizes = method_sizes(cfg, ckpt, model_cfg, method)
        out[method] = sum(minimum_parts(sizes, cfg.n_buffers).values())
    return out


def _draft_bytes(cfg: RuntimeConfig, target_cfg: ModelConfig) -> int:
    """Bytes classic speculation's draft keeps resident (0 without it), from headers only."""
    if "classic" not in cfg.methods:
        return 0
    draft_cfg = _draft_config(cfg)
    model_dir = resolve_model(draft_cfg.model, progress=False)
    model_cfg = ModelConfig.from_dir(model_dir)
    draft_cfg = resolve_context(draft_cfg, model_cfg)
    with Checkpoint(model_dir) as ckpt:
        return plan(Builder(draft_cfg, ckpt, model_cfg, None).sizes(), None).resident_bytes


def _draft_config(cfg: RuntimeConfig) -> RuntimeConfig:
    """Classic speculation's draft, configured like a target: everything resident, embedding
    rows read on demand (they need not take budget)."""
    return replace(
        cfg, model=cfg.draft_model, memory_budget=None, methods=("vanilla",),
        draft_model=None, map_embeddings=True,
    )  # fmt: skip


def _eos_ids(model_cfg: ModelConfig, tokenizer) -> frozenset[int]:
    ids = set(model_cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _classic_draft(cfg: RuntimeConfig, target_cfg: ModelConfig, progress: bool) -> Loaded:
    """Classic speculation's draft, loaded (see _draft_config)."""
    draft_cfg = _draft_config(cfg)
    model_dir = resolve_model(draft_cfg.model, progress=progress)
    model_cfg = ModelConfig.from_dir(model_dir)
    if model_cfg.vocab_size != target_cfg.vocab_size:
        raise SubspecError(
            f"draft model {cfg.draft_model} has vocabulary {model_cfg.vocab_size}, "
            f"the target {target_cfg.vocab_size}: they must share a tokenizer"
        )
    draft_cfg = resolve_context(draft_cfg, model_cfg)
    with progress_bars(progress) as bars, Checkpoint(model_dir) as ckpt:
        return Builder(draft_cfg, ckpt, model_cfg, bars).load()


@dataclass
class Loaded:
    """What a Builder produced: the placed model and, where layers stream, their machinery."""

    placement: Placement
    model: PlacedModel
    streaming: Streaming | None
    shared_drafter: SharedDrafter | None


class Builder:
    """Sizes, plans and loads one checkpoint for one RuntimeConfig."""

    def __init__(
        self, cfg: RuntimeConfig, ckpt: Checkpoint, model_cfg: ModelConfig, bars: Progress
    ):
        self.cfg, self.ckpt, self.model_cfg, self.bars = cfg, ckpt, model_cfg, bars
        self.dtype, self.device = cfg.torch_dtype, torch.device(cfg.device)
        self.head_name = lm_head_name(ckpt, model_cfg)
        self.tied = self.head_name == EMBED
        self.subspec = "subspec" in cfg.methods
        # layer files and substitutes of this checkpoint at this dtype
        self.cache_dir = cache_root() / "offload" / f"{fingerprint(ckpt)}-{cfg.dtype}"
        # the full LM head [V, H], read from the checkpoint at most once: to keep it resident,
        # or to build its chunk files or the draft's low-bit copy when those are not cached
        self.load_head = functools.cache(functools.partial(ckpt.get, self.head_name, self.dtype))

    def sizes(self, extra_bytes: int = 0) -> ModelSizes:
        """Bytes of every part in fast memory, for the planner."""
        m, dt, spec = self.model_cfg, self.dtype, self.cfg.spec
        item = dt.itemsize
        table = m.vocab_size * m.hidden_size * item  # embeddings or LM head
        largest = max(m.vocab_size * m.hidden_size, *(o * i for o, i in m.linear_shapes.values()))
        sub = self.subspec
        return ModelSizes(
            num_layers=m.num_layers,
            layer_bytes=layer_nbytes(m, dt),
            substitute_bytes=(
                substitute_nbytes(m, spec.bits, spec.group_size, dt, self.device) if sub else 0
            ),
            embed_bytes=0 if self.cfg.map_embeddings and not self.tied else table,
            lm_head_bytes=0 if self.tied else table,
            norm_bytes=m.hidden_size * item,
            kv_bytes=KVCache.nbytes_for(
                m.num_layers, m.num_kv_heads, m.head_dim, self.cfg.capacity, dt
            ),
            extra_bytes=extra_bytes,
            draft_head_bytes=self._draft_head_bytes() if sub else 0,
            scratch_bytes=widen_scratch_bytes(dt, self.device, largest),
            head_can_stream=not (sub and spec.head_bits == 16),
            workspace_bytes=workspace_nbytes(
                m, max(self.cfg.prefill_chunk, spec.tree_size), self.cfg.capacity, dt, self.device
            ),
        )

    def _draft_head_bytes(self) -> int:
        m, spec = self.model_cfg, self.cfg.spec
        if spec.head_bits == 16:
            return 0
        return quant.quantized_nbytes(m.vocab_size, m.hidden_size, spec.head_bits,
                                      spec.group_size, compute_dtype=self.dtype,
                                      device=self.device)  # fmt: skip

    def load(self, extra_bytes: int = 0) -> Loaded:
        """Plan for the budget, then load what is resident and prepare what streams."""
        m, cfg = self.model_cfg, self.cfg
        budget = fast_memory_budget(cfg.memory_budget, self.device)
        placement = plan(self.sizes(extra_bytes), budget, cfg.n_buffers)
        resident = load_resident(
            self.ckpt, m, placement.resident_layers, self.dtype, self.device, cfg.exact
        )
        streaming, streamed_head = None, None
        if placement.streamed_layers:
            streaming, streamed_head = self._stream(placement)
        lm_head = self.load_head().to(self.device) if placement.lm_head_resident else None
        final_norm = self.ckpt.get(FINAL_NORM, self.dtype).to(self.device)
        embed = self._embedding(placement, lm_head)
        head = streamed_head
        if placement.lm_head_resident:  # exact: logits straight from the fp32 accumulators
            head = dense(lm_head, exact=cfg.exact, out_dtype=torch.float32 if cfg.exact else None)
        model = Model(m, embed, final_norm, head, self.dtype, self.device, cfg.capacity, cfg.exact)
        cache = KVCache(m.num_layers, m.num_kv_heads, m.head_dim, cfg.capacity, self.dtype,
                        self.device)  # fmt: skip
        streamed = streaming.layers if streaming else None
        placed = PlacedModel(model, LayerSource(resident, m.num_layers, streamed), cache)
        drafter = self._shared_drafter(placed, placement, resident) if self.subspec else None
        return Loaded(placement, placed, streaming, drafter)

    def _embedding(self, placement: Placement, lm_head: torch.Tensor | None) -> Embedding:
        if self.tied and placement.lm_head_resident:
            return Embedding(weight=lm_head)
        if placement.embed_resident and not self.cfg.map_embeddings:
            return Embedding(weight=self.ckpt.get(EMBED, self.dtype).to(self.device))
        return Embedding(mapped=self.ckpt.rows(EMBED), dtype=self.dtype, device=self.device)

    def _stream(self, placement: Placement) -> tuple[Streaming, StreamedHead | None]:
        """The slow tier (the layers, and LM head chunks when the head streams) and its
        prefetcher, which reads units in the order a forward pass and its logits use them."""
        m, layers = self.model_cfg, placement.streamed_layers
        sources = layer_sources(self.ckpt, m, layers, self.dtype)
        head = {}
        if not placement.lm_head_resident:
            head = head_sources(self.load_head, m, self.dtype, m.num_layers)
        store = self._slow_store(sources, head)
        head_units = list(head)
        prefetcher = Prefetcher(store, layers + head_units, self.cfg.n_buffers, self.device)
        streamed = StreamedLayers(prefetcher, store.manifests, self.cfg.exact)
        streaming = Streaming(streamed, prefetcher, getattr(store, "mode", "pinned-host"))
        return streaming, StreamedHead(streamed, head_units) if head_units else None

    def _slow_store(self, layers: dict, head: dict) -> SlowStore:
        """Disk for a CPU: layer files written once, read with O_DIRECT. Pinned host RAM for
        CUDA, packed straight from the checkpoint (no disk copy of a RAM tier)."""
        if self.device.type == "cpu":
            directory = self.cache_dir / "layers"
            manifests = ensure_files(directory, layers, "writing layer files", self.bars)
            manifests |= ensure_files(directory, head, "writing LM head chunks", self.bars)
            return DiskStore(directory, manifests)
        units = layers | head
        task = self.bars.add_task("packing layers into pinned host RAM", total=len(units))

        def packed(source):
            self.bars.advance(task)
            return source()

        return PinnedHostStore({u: functools.partial(packed, f) for u, f in units.items()})

    def _shared_drafter(self, target: PlacedModel, placement: Placement, resident):
        """SubSpec's draft: the resident layers shared, substitutes for the streamed ones."""
        if not placement.streamed_layers:
            return SharedDrafter(target, LayerSource(resident, self.model_cfg.num_layers))
        spec, m = self.cfg.spec, self.model_cfg
        path = self.cache_dir / f"substitutes-{self._quant_tag(spec.bits)}"
        subs = load_substitutes(
            self.ckpt, m, placement.streamed_layers, self.dtype, self.device, spec, path,
            self.bars,
        )  # fmt: skip
        layers = LayerSource({**resident, **subs}, m.num_layers)
        return SharedDrafter(target, layers, self._draft_head())

    def _draft_head(self):
        spec, m = self.cfg.spec, self.model_cfg
        if spec.head_bits == 16:
            return None  # share the target's head
        path = self.cache_dir / f"draft-head-{self._quant_tag(spec.head_bits)}.safetensors"
        shape = (m.vocab_size, m.hidden_size)
        return load_draft_head(self.load_head, shape, self.dtype, self.device, spec, path,
                               self.bars)  # fmt: skip

    def _quant_tag(self, bits: int) -> str:
        spec = self.cfg.spec
        return f"b{bits}-g{spec.group_size}-{'hqq' if spec.hqq_optimize else 'rtn'}"

"""Building a runtime: resolve the model, size it, plan the placement, prepare the caches
(layer files, substitutes) and load. Config in, runtime out.

One builder for every device: `device` is where compute happens (the fast tier), and the
slow tier is disk on a CPU machine or pinned host RAM on a CUDA machine.
"""

from __future__ import annotations

import functools
import gc
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.progress import Progress

from subspec.config import RuntimeConfig
from subspec.errors import SubspecError
from subspec.hub.models import resolve_model
from subspec.kernels import residual
from subspec.memory import (
    current_rss_bytes,
    fast_memory_budget,
    peak_rss_bytes,
    release_free_memory,
)
from subspec.model.checkpoint import EMBED, FINAL_NORM, Checkpoint, lm_head_name
from subspec.model.config import ModelConfig
from subspec.model.forward import Embedding, Model
from subspec.model.kv_cache import KVCache
from subspec.model.layers import LayerSource, dense
from subspec.model.placed import PlacedModel
from subspec.model.tokenizer import load_tokenizer
from subspec.offload.cache_entries import offload_root, record_entry
from subspec.offload.planner import Placement, plan
from subspec.offload.prefetch import Prefetcher
from subspec.offload.stores import DiskStore, PinnedHostStore, SlowStore
from subspec.offload.streamed import Rebuild, StreamedHead, StreamedLayers
from subspec.progress import progress_bars
from subspec.runtime.runtime import Runtime, Streaming
from subspec.runtime.sizing import (
    draft_bytes,
    draft_config,
    model_sizes,
    plan_checked,
    process_bytes,
    residual_streams,
    resolve_context,
)
from subspec.runtime.weights import (
    drop_stale_residual_files,
    ensure_files,
    fingerprint,
    head_sources,
    layer_sources,
    load_draft_head,
    load_resident,
    load_substitutes,
    residual_dir,
    residual_sources,
    write_unit,
)
from subspec.speculative.drafters import ModelDrafter, SharedDrafter

log = logging.getLogger(__name__)


def build_runtime(cfg: RuntimeConfig, progress: bool = True) -> Runtime:
    """Load cfg.model under cfg.memory_budget with the drafts for cfg.methods."""
    model_dir = resolve_model(cfg.model, progress=progress)
    model_cfg = ModelConfig.from_dir(model_dir)
    cfg = resolve_context(cfg, model_cfg)
    tokenizer = load_tokenizer(model_dir)
    gc.collect()  # what an earlier runtime in this process left (bench) is not overhead
    release_free_memory()
    rss_before_load = current_rss_bytes()  # fixed overhead: torch, tokenizer, ...
    process = process_bytes(cfg, rss_before_load)
    with Checkpoint(model_dir) as ckpt:  # headers only: refuse an impossible plan before loading
        plan_checked(cfg, ckpt, model_cfg, draft_bytes(cfg, model_cfg), process)
    classic = _classic_draft(cfg, model_cfg, progress) if "classic" in cfg.methods else None
    extra = classic.placement.resident_bytes if classic else 0
    with progress_bars(progress) as bars, Checkpoint(model_dir) as ckpt:
        loaded = Builder(cfg, ckpt, model_cfg, bars, process).load(extra_bytes=extra)
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
        load_peak_rss=peak_rss_bytes(),
        drafters=drafters,
    )  # fmt: skip


def _eos_ids(model_cfg: ModelConfig, tokenizer) -> frozenset[int]:
    ids = set(model_cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _classic_draft(cfg: RuntimeConfig, target_cfg: ModelConfig, progress: bool) -> Loaded:
    """Classic speculation's draft, loaded (see sizing.draft_config)."""
    draft_cfg = draft_config(cfg)
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
        self, cfg: RuntimeConfig, ckpt: Checkpoint, model_cfg: ModelConfig, bars: Progress,
        process: int = 0,
    ):  # fmt: skip
        """`process`: the budget's share the process itself takes (sizing.process_bytes)."""
        self.cfg, self.ckpt, self.model_cfg, self.bars = cfg, ckpt, model_cfg, bars
        self.process = process
        self.dtype, self.device = cfg.torch_dtype, torch.device(cfg.device)
        self.head_name = lm_head_name(ckpt, model_cfg)
        self.tied = self.head_name == EMBED
        self.subspec = "subspec" in cfg.methods
        # layer files and substitutes of this checkpoint at this dtype
        self.cache_dir = offload_root() / f"{fingerprint(ckpt)}-{cfg.dtype}"
        # rows [a, b) of the LM head [V, H]: its chunk files and the draft's low-bit copy are
        # built a block of rows at a time, never from the whole head in memory
        self.head_rows = functools.partial(ckpt.get_rows, self.head_name, dtype=self.dtype)

    def load(self, extra_bytes: int = 0) -> Loaded:
        """Plan for the budget, then load what is resident and prepare what streams; in
        residual form where it applies, else (the codec does not run here, or a layer strays
        too far from its substitute) with whole layers."""
        if not residual_streams(self.cfg, self.model_cfg):
            return self._load(extra_bytes)
        reason = "the residual codec does not run here"
        if residual.available():
            try:
                return self._load(extra_bytes)
            except residual.TooManyEscapes as e:
                reason = str(e)  # (the exception's frames, holding what was loaded, go)
        log.warning("layers stream whole, not in residual form: %s", reason)
        return self._plain_stream().load(extra_bytes)

    def _load(self, extra_bytes: int) -> Loaded:
        m, cfg = self.model_cfg, self.cfg
        budget = fast_memory_budget(cfg.memory_budget, self.device)
        sizes = model_sizes(cfg, self.ckpt, m, extra_bytes, self.process)
        placement = plan(sizes, budget, cfg.n_buffers)
        if placement.streamed_layers:  # files in the cache: say whose
            record_entry(self.cache_dir, cfg.model, self.ckpt.model_dir, cfg.dtype)
        substitutes = draft_head = None
        if self.subspec and placement.streamed_layers:  # first: little else is in memory yet
            substitutes = self._substitutes(placement)
            draft_head = self._draft_head()
        streaming, streamed_head = None, None
        if placement.streamed_layers:  # before the resident layers: residual form may fail
            rebuilt_from = substitutes if residual_streams(cfg, m) else None
            streaming, streamed_head = self._stream(placement, rebuilt_from)
        resident = load_resident(
            self.ckpt, m, placement.resident_layers, self.dtype, self.device, cfg.exact
        )
        lm_head = None
        if placement.lm_head_resident:
            lm_head = self.ckpt.get(self.head_name, self.dtype).to(self.device)
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
        drafter = None
        if self.subspec:
            drafter = self._shared_drafter(placed, resident, substitutes, draft_head)
        return Loaded(placement, placed, streaming, drafter)

    def _plain_stream(self) -> Builder:
        """This builder with layers streaming whole (not in residual form)."""
        spec = replace(self.cfg.spec, residual_stream=False)
        cfg = replace(self.cfg, spec=spec)
        return Builder(cfg, self.ckpt, self.model_cfg, self.bars, self.process)

    def _embedding(self, placement: Placement, lm_head: torch.Tensor | None) -> Embedding:
        if self.tied and placement.lm_head_resident:
            return Embedding(weight=lm_head)
        if placement.embed_resident and not self.cfg.map_embeddings:
            return Embedding(weight=self.ckpt.get(EMBED, self.dtype).to(self.device))
        return Embedding(mapped=self.ckpt.rows(EMBED), dtype=self.dtype, device=self.device)

    def _stream(self, placement: Placement, substitutes: dict | None):
        """The slow tier (the layers, and LM head chunks when the head streams) and its
        prefetcher, which reads units in the order a forward pass and its logits use them;
        with `substitutes` ({layer: LayerWeights}) the layers go in residual form."""
        m, layers = self.model_cfg, placement.streamed_layers
        if substitutes is None:
            sources = layer_sources(self.ckpt, m, layers, self.dtype)
            directory, rebuild = self.cache_dir / "layers", None
        else:
            substitutes = {i: substitutes[i] for i in layers}  # the streamed layers'
            sources = residual_sources(self.ckpt, m, layers, self.dtype, substitutes)
            # named by the staging buffer's size, which sets the LM head chunks' rows
            directory = residual_dir(self._substitutes_dir(), placement.buffer_bytes)
            drop_stale_residual_files(directory, substitutes)
            largest = max(o * i for o, i in m.linear_shapes.values())
            rebuild = Rebuild(substitutes, largest, self.cfg.exact)
        head = {}
        if not placement.lm_head_resident:
            head = head_sources(self.head_rows, m, self.dtype, m.num_layers,
                                placement.buffer_bytes)  # fmt: skip
        store = self._slow_store(sources, head, directory)
        head_units = list(head)
        prefetcher = Prefetcher(store, layers + head_units, self.cfg.n_buffers, self.device)
        streamed = StreamedLayers(prefetcher, store.manifests, self.cfg.exact, rebuild)
        streaming = Streaming(streamed, prefetcher, getattr(store, "mode", "pinned-host"))
        return streaming, StreamedHead(streamed, head_units) if head_units else None

    def _slow_store(self, layers: dict, head: dict, directory: Path) -> SlowStore:
        """Disk for a CPU: layer files written once in `directory`, read with O_DIRECT (and
        written anew from their sources when a read finds one corrupted). Pinned host RAM for
        CUDA, packed straight from the checkpoint (no disk copy of a RAM tier)."""
        if self.device.type == "cpu":
            manifests = ensure_files(directory, layers, "writing layer files", self.bars)
            manifests |= ensure_files(directory, head, "writing LM head chunks", self.bars)
            rebuild = functools.partial(write_unit, directory, layers | head)
            return DiskStore(directory, manifests, rebuild=rebuild)
        units = layers | head
        task = self.bars.add_task("packing layers into pinned host RAM", total=len(units))

        def packed(source):
            self.bars.advance(task)
            return source()

        return PinnedHostStore({u: functools.partial(packed, f) for u, f in units.items()})

    def _substitutes(self, placement: Placement) -> dict:
        """{layer: its low-bit substitute (LayerWeights)}, cached on disk: of every layer
        (placement.substitutes_everywhere) or of the streamed ones."""
        layers = placement.streamed_layers
        if placement.substitutes_everywhere:
            layers = placement.resident_layers + layers
        return load_substitutes(
            self.ckpt, self.model_cfg, layers, self.dtype, self.device, self.cfg.spec,
            self._substitutes_dir(), self.bars,
        )  # fmt: skip

    def _substitutes_dir(self) -> Path:
        return self.cache_dir / f"substitutes-{self._quant_tag(self.cfg.spec.bits)}"

    def _shared_drafter(self, target: PlacedModel, resident, substitutes: dict | None,
                        draft_head) -> SharedDrafter:  # fmt: skip
        """SubSpec's draft: substitutes where there are (the streamed layers, or every layer),
        the resident layers shared elsewhere, and `draft_head` (None: the target's LM head)."""
        if not substitutes:
            return SharedDrafter(target, LayerSource(resident, self.model_cfg.num_layers))
        layers = LayerSource({**resident, **substitutes}, self.model_cfg.num_layers)
        return SharedDrafter(target, layers, draft_head)

    def _draft_head(self):
        spec, m = self.cfg.spec, self.model_cfg
        if spec.head_bits == 16:
            return None  # share the target's head
        path = self.cache_dir / f"draft-head-{self._quant_tag(spec.head_bits)}.safetensors"
        shape = (m.vocab_size, m.hidden_size)
        return load_draft_head(self.head_rows, shape, self.dtype, self.device, spec, path,
                               self.bars)  # fmt: skip

    def _quant_tag(self, bits: int) -> str:
        spec = self.cfg.spec
        return f"b{bits}-g{spec.group_size}-{'hqq' if spec.hqq_optimize else 'rtn'}"

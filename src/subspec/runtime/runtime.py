"""The runtime: a target placed under a budget and the drafters that serve it.

It holds no per-request state (runtime/session.py does) but what its KV cache holds between
requests: the last request's prompt and committed tokens, whose longest prefix in common with
the next prompt is kept (prefix reuse: a chat's next turn prefills only what is new). One
runtime serves request after request, one at a time. Built by runtime/build.py.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from subspec.config import RuntimeConfig, SamplingConfig
from subspec.errors import SubspecError
from subspec.model.config import ModelConfig
from subspec.model.placed import PlacedModel
from subspec.model.tokenizer import encode
from subspec.offload.planner import Placement
from subspec.offload.prefetch import Prefetcher
from subspec.offload.streamed import StreamedLayers
from subspec.runtime.logprobs import MAX_TOP_LOGPROBS
from subspec.runtime.stats import MemoryStats
from subspec.speculative.decoding import Batch, DecodeStats, speculative, vanilla
from subspec.speculative.drafters import Drafter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What one generation asks for."""

    prompt_ids: list[int]
    method: str
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()  # stop strings
    # set by whoever may abandon the request (the server's queue): prefill stops between its
    # chunks once it is set (speculative/decoding.py, Cancelled)
    cancelled: threading.Event | None = None
    # None: no log probabilities; k: each token's, and the k most likely at its place
    logprobs: int | None = None


@dataclass
class Streaming:
    """The slow-tier side of a placement: the streamed layers, their prefetcher and store."""

    layers: StreamedLayers
    prefetcher: Prefetcher
    store_mode: str  # "direct" or "buffered" disk reads, or "pinned-host"

    def reset(self) -> None:
        """Ready for a request: zero the counters, and read again after a failed read."""
        reason = self.prefetcher.failure
        if self.prefetcher.recover():
            log.warning("the slow tier's reader had stopped (%s): reading again", reason)
        self.layers.bytes_used = 0
        self.prefetcher.reset_stats()

    def close(self) -> None:
        self.prefetcher.close()
        self.prefetcher.store.close()


@dataclass
class Runtime:
    """A loaded model ready to decode with `methods`."""

    cfg: RuntimeConfig
    model_cfg: ModelConfig
    tokenizer: object  # a transformers tokenizer
    eos_ids: frozenset[int]
    placement: Placement
    target: PlacedModel
    streaming: Streaming | None  # None when everything is resident
    rss_before_load: int
    load_peak_rss: int  # peak RSS through loading and preparation (quantizing, writing files)
    drafters: dict[str, Drafter] = field(default_factory=dict)  # method -> its draft
    # the token ids of the last request (prompt, then committed tokens): the cache's slots hold
    # their KV as far as its length reaches
    history: list[int] = field(default_factory=list)
    _closed: bool = False

    @property
    def methods(self) -> tuple[str, ...]:
        return ("vanilla", *self.drafters)

    def check(self, prompt_len: int, max_new_tokens: int, method: str,
              logprobs: int | None = None) -> None:  # fmt: skip
        """Refuse a request that names an unloaded method, would overflow the KV cache or asks
        for more top log probabilities than MAX_TOP_LOGPROBS."""
        if method not in self.methods:
            raise SubspecError(
                f"method {method!r} is not loaded; available: {', '.join(self.methods)}"
            )
        if prompt_len < 1:
            raise SubspecError("the prompt is empty")
        if max_new_tokens < 1:
            raise SubspecError(f"max new tokens must be >= 1, got {max_new_tokens}")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise SubspecError(f"top logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {logprobs}")
        if prompt_len + max_new_tokens > self.cfg.context:
            raise SubspecError(
                f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the "
                f"context of {self.cfg.context} tokens (raise --context)"
            )

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        """Token ids of a prompt, through the model's chat template when `chat`."""
        return encode(self.tokenizer, prompt, chat)

    def start(self, prompt_ids: list[int]) -> int:
        """Ready the cache for a new request and zero the transfer counters. The cache keeps
        the longest prefix it holds of `prompt_ids`, all of the prompt but its last token at
        most (whose logits the request needs), nothing with prefix_cache off; `history`
        becomes the prompt, for the request to extend. Returns the prompt tokens kept."""
        held = self.history[: self.target.cache.length] if self.cfg.prefix_cache else []
        kept = len(os.path.commonprefix([held, prompt_ids[:-1]]))  # works on any sequences
        self.target.cache.trim(kept)
        self.history = list(prompt_ids)
        if self.streaming is not None:
            self.streaming.reset()
        return kept

    def decode(self, request: Request, gen, counters: DecodeStats) -> Iterator[Batch]:
        """The request's method as a stream of committed tokens, a Batch per target pass."""
        chunk, prompt, sampling = self.cfg.prefill_chunk, request.prompt_ids, request.sampling
        if request.method == "vanilla":
            return vanilla(self.target, prompt, sampling, gen, counters, chunk, request.cancelled)
        drafter = self.drafters[request.method]
        return speculative(
            self.target, drafter, prompt, sampling, self.cfg.spec, gen, counters, chunk,
            request.cancelled,
        )  # fmt: skip

    def forget(self) -> None:
        """Drop the cached prefix: the next request prefills its whole prompt."""
        self.history = []
        self.target.cache.trim(0)

    def memory_stats(self) -> MemoryStats:
        p, s = self.placement, self.streaming
        return MemoryStats(
            bytes_streamed=s.layers.bytes_used if s else 0,
            transfer_wait_s=round(s.prefetcher.stats.wait_s, 4) if s else 0.0,
            read_bytes=s.prefetcher.stats.bytes_read if s else 0,
            read_s=round(s.prefetcher.stats.read_s, 4) if s else 0.0,
            memory_budget_bytes=p.budget_bytes,
            resident_bytes=p.resident_bytes,
            rss_before_load_bytes=self.rss_before_load,
            load_peak_rss_bytes=self.load_peak_rss,
            placement=p.to_dict(),
        )

    def unavailable(self) -> str | None:
        """Why this runtime cannot serve a request now (its slow tier's reader failed or was
        closed), or None."""
        if self.streaming is None:
            return "closed" if self._closed else None
        return self.streaming.prefetcher.failure

    def close(self) -> None:
        """Stop the prefetcher's threads and close the slow tier's files (idempotent)."""
        if self.streaming is not None and not self._closed:
            self.streaming.close()
        self._closed = True

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

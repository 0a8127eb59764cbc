"""One request on a runtime: its settings, its random generator, its counters and stats."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from subspec.memory import (
    device_peak_bytes,
    peak_rss_bytes,
    release_free_memory,
    reset_device_peak,
    reset_peak_rss,
)
from subspec.runtime.runtime import Request, Runtime
from subspec.runtime.stats import GenerationStats, SpecStats
from subspec.speculative.decoding import Batch, DecodeStats


class Session:
    """A request's state: validated against the runtime, which is readied for it (keeping the
    cached prefix of its prompt)."""

    def __init__(self, runtime: Runtime, request: Request):
        runtime.check(len(request.prompt_ids), request.max_new_tokens, request.method,
                      request.logprobs)  # fmt: skip
        self.runtime, self.request = runtime, request
        # on the runtime's device: torch.multinomial needs a generator where its input lives
        device = runtime.target.device
        self.gen = torch.Generator(device=device).manual_seed(request.sampling.seed)
        self.counters = DecodeStats()
        self.cached_prompt_tokens = runtime.start(request.prompt_ids)
        release_free_memory()  # what earlier requests freed: glibc would keep it in RSS
        reset_peak_rss()
        reset_device_peak(device)
        self.started = time.perf_counter()

    def token_batches(self) -> Iterator[Batch]:
        """The method's committed tokens, a Batch per target pass (speculative/decoding.py);
        each joins the runtime's history as it commits."""
        history = self.runtime.history  # the prompt, so far
        for batch in self.runtime.decode(self.request, self.gen, self.counters):
            history.extend(batch.tokens)
            yield batch

    def stats(self, new_tokens: int) -> GenerationStats:
        """The record of this generation so far, `new_tokens` emitted."""
        c, method = self.counters, self.request.method
        elapsed = time.perf_counter() - self.started
        decode_s = max(elapsed - c.prefill_s, 1e-9)
        decode_tokens = max(new_tokens - 1, 0)  # the first token comes out of prefill
        spec = None
        if method != "vanilla":
            rounds = len(c.accept_lengths)
            spec = SpecStats(
                tau=decode_tokens / rounds if rounds else 0.0,
                draft_s=round(c.draft_s, 4),
                verify_s=round(c.verify_s, 4),
                overlap_s=round(c.overlap_s, 4),
                draft_steps=c.draft_steps + c.lookahead_steps,
                lookahead_hits=c.lookahead_hits,
                depth=round(sum(c.depths) / len(c.depths), 2) if c.depths else 0.0,
                width=round(sum(c.widths) / len(c.widths), 2) if c.widths else 0.0,
                widths=list(c.widths),
                depths=list(c.depths),
                accept_lengths=list(c.accept_lengths),
                rounds=[[round(t, 4) for t in r] for r in c.rounds],
                ahead_steps=c.lookahead_steps,
            )
        return GenerationStats(
            method=method,
            prompt_tokens=len(self.request.prompt_ids),
            cached_prompt_tokens=self.cached_prompt_tokens,
            new_tokens=new_tokens,
            prefill_s=round(c.prefill_s, 4),
            decode_s=round(decode_s, 4),
            decode_tokens_per_s=decode_tokens / decode_s,
            target_forwards=c.target_forwards,
            peak_rss_bytes=peak_rss_bytes(),
            device_peak_bytes=device_peak_bytes(self.runtime.target.device),
            memory=self.runtime.memory_stats(),
            spec=spec,
            top2_margins=[round(m, 4) for m in c.margins[:new_tokens]] if c.margins else None,
        )

"""The one generation contract: a stream of events that the CLI, server and bench consume.

`stream_generate` runs any method (vanilla, subspec, classic) and applies what they share:
EOS, stop strings, the token limit, incremental text, timings and statistics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .config import SamplingConfig
from .decoding import DecodeStats
from .errors import SubspecError
from .memory import peak_rss_bytes, reset_peak_rss


@dataclass
class Event:
    """New text and tokens; the final event has `finish_reason` and `stats` set."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    stats: dict = field(default_factory=dict)


class TextStream:
    """Incremental detokenization that never emits half a multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0
        self.text = ""  # all ids decoded so far

    def add(self, ids: list[int]) -> str:
        """Append ids; returns the new text that is safe to show."""
        self.ids.extend(ids)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.text.endswith("\ufffd"):
            return ""
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta


def stream_generate(
    engine,
    prompt_ids: list[int],
    *,
    method: str,
    max_new_tokens: int,
    sampling: SamplingConfig,
    stop: tuple[str, ...] = (),
) -> Iterator[Event]:
    """Generate up to max_new_tokens after prompt_ids, yielding events as tokens commit."""
    if max_new_tokens < 1:
        raise SubspecError(f"max new tokens must be >= 1, got {max_new_tokens}")
    engine.check_fits(len(prompt_ids), max_new_tokens, method)
    gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
    stats = DecodeStats()
    engine.reset()
    reset_peak_rss()
    text_stream = TextStream(engine.tokenizer)
    out: list[int] = []
    start = time.perf_counter()
    reason = None
    for ids in engine.decode(method, prompt_ids, sampling, gen, stats):
        ids, reason = _apply_stops(ids, len(out), max_new_tokens, engine.eos_ids)
        out.extend(ids)
        delta = text_stream.add(ids)
        if stop and (hit := _find_stop(text_stream.text, stop)) is not None:
            yield Event(text_stream.text[text_stream.sent - len(delta) : hit], ids)
            reason = "stop"
            break
        yield Event(delta, ids)
        if reason:
            break
    elapsed = time.perf_counter() - start
    final = _stats(engine, method, stats, len(prompt_ids), len(out), elapsed)
    yield Event("", [], finish_reason=reason, stats=final)


def _apply_stops(ids, emitted, limit, eos_ids) -> tuple[list[int], str | None]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1], "stop"
    room = limit - emitted
    if len(ids) >= room:
        return ids[:room], "length"
    return ids, None


def _find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _stats(engine, method, s: DecodeStats, prompt_len, new_tokens, elapsed) -> dict:
    decode_s = max(elapsed - s.prefill_s, 1e-9)
    decode_tokens = max(new_tokens - 1, 0)  # the first token comes out of prefill
    stats = {
        "method": method,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "prefill_s": round(s.prefill_s, 4),
        "decode_s": round(decode_s, 4),
        "decode_tokens_per_s": decode_tokens / decode_s,
        "target_forwards": s.target_forwards,
        "peak_rss_bytes": peak_rss_bytes(),
        **engine.stream_stats(),
    }
    if s.margins:
        stats["top2_margins"] = [round(m, 4) for m in s.margins[:new_tokens]]
    if method != "vanilla":
        rounds = len(s.accept_lengths)
        stats.update(
            tau=decode_tokens / rounds if rounds else 0.0,
            draft_s=round(s.draft_s, 4),
            verify_s=round(s.verify_s, 4),
            accept_lengths=s.accept_lengths,
        )
    return stats

"""The one generation contract: a stream of events that the CLI, server and bench consume.

`stream_generate` runs any method (vanilla, subspec, classic) on a runtime and applies what
they share: EOS, stop strings, the token limit, incremental text, timings and statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from subspec.runtime.runtime import Request, Runtime
from subspec.runtime.session import Session
from subspec.runtime.stats import GenerationStats


@dataclass
class Event:
    """New text and tokens; the final event has `finish_reason` and `stats` set."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    stats: GenerationStats | None = None


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


def stream_generate(runtime: Runtime, request: Request) -> Iterator[Event]:
    """Generate up to request.max_new_tokens after its prompt, yielding events as tokens
    commit; the request is checked (SubspecError) before anything runs."""
    session = Session(runtime, request)
    return _events(session)


def _events(session: Session) -> Iterator[Event]:
    runtime, request = session.runtime, session.request
    text_stream = TextStream(runtime.tokenizer)
    out: list[int] = []
    reason = None
    for ids in session.token_batches():
        ids, reason = _apply_stops(ids, len(out), request.max_new_tokens, runtime.eos_ids)
        out.extend(ids)
        delta = text_stream.add(ids)
        if request.stop and (hit := _find_stop(text_stream.text, request.stop)) is not None:
            yield Event(text_stream.text[text_stream.sent - len(delta) : hit], ids)
            reason = "stop"
            break
        yield Event(delta, ids)
        if reason:
            break
    yield Event("", [], finish_reason=reason, stats=session.stats(len(out)))


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

"""The one generation contract: a stream of events that the CLI, server and bench consume.

`stream_generate` runs any method (vanilla, subspec, classic) on a runtime and applies what
they share: EOS, stop strings, the token limit, incremental text, timings and statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from subspec.runtime.logprobs import TokenLogprob, batch_logprobs
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
    # one per token id when the request asks for them (the final event's: []), else None
    logprobs: list[TokenLogprob] | None = None


class TextStream:
    """Incremental detokenization that never shows half a multi-byte character, nor text that
    could be the start of a stop string; finds the first stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop, self.ids, self.sent = tokenizer, stop, [], 0
        self.text = ""  # all ids decoded so far

    def add(self, ids: list[int]) -> str:
        """Append ids; returns the new text that is safe to show."""
        self.ids.extend(ids)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.text.endswith("\ufffd"):
            return ""
        end = len(self.text) - self._held_back()
        delta, self.sent = self.text[self.sent : end], max(end, self.sent)
        return delta

    def flush(self) -> str:
        """The text held back for a possible stop string, at the end of generation."""
        if self.text.endswith("\ufffd"):
            return ""
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta

    def stop_at(self, start: int) -> int | None:
        """Where the first stop string starts in the text at or after `start` (what was shown
        before the last `add`: text that could begin a stop string is held back), or None."""
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def tokens_before(self, end: int) -> int:
        """The fewest leading tokens whose text reaches `end`: the tokens whose text (or part
        of it) is shown when the text is cut at `end`."""
        lo, hi = 0, len(self.ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(self.ids[:mid], skip_special_tokens=True)) >= end:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _held_back(self) -> int:
        """Length of the longest text suffix that begins some stop string."""
        for n in range(min(max(map(len, self.stop), default=1) - 1, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop):
                return n
        return 0


def stream_generate(runtime: Runtime, request: Request) -> Iterator[Event]:
    """Generate up to request.max_new_tokens after its prompt, yielding events as tokens
    commit; the request is checked (SubspecError) before anything runs."""
    session = Session(runtime, request)
    return _events(session)


def _events(session: Session) -> Iterator[Event]:
    """Limits in order, per committed batch: the token limit cuts the batch first, then its
    first EOS, then the first stop string; only the tokens whose text is shown are counted."""
    runtime, request = session.runtime, session.request
    text = TextStream(runtime.tokenizer, request.stop)
    top = request.logprobs
    entries = [] if top is not None else None  # one per token in text.ids
    emitted, reason = 0, None
    for batch in session.token_batches():
        ids, reason = _apply_limits(batch.tokens, emitted, request.max_new_tokens, runtime.eos_ids)
        if entries is not None:
            entries.extend(batch_logprobs(batch, len(ids), top))
        shown = text.sent
        delta = text.add(ids)
        hit = text.stop_at(shown) if request.stop else None
        if hit is not None:  # tokens already passed on but wholly inside the stop don't count
            kept = text.tokens_before(hit)
            yield Event(text.text[shown:hit], text.ids[emitted:kept],
                        logprobs=_part(entries, emitted, kept))  # fmt: skip
            emitted, reason = kept, "stop"
            break
        if reason:
            delta += text.flush()
        yield Event(delta, ids, logprobs=_part(entries, emitted, emitted + len(ids)))
        emitted += len(ids)
        if reason:
            break
    else:  # the method ran out of room before any limit
        if tail := text.flush():
            yield Event(tail, [], logprobs=_part(entries, 0, 0))
    yield Event("", [], reason, session.stats(emitted), _part(entries, 0, 0))


def _part(entries: list | None, start: int, end: int) -> list | None:
    return None if entries is None else entries[start:end]


def _apply_limits(ids, emitted, limit, eos_ids) -> tuple[list[int], str | None]:
    """The batch cut to the room left, then after its first EOS."""
    room = limit - emitted
    reason = "length" if len(ids) >= room else None
    ids = ids[:room]
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1], "stop"
    return ids, reason

"""The Python API: load a model under a memory budget, then generate, stream or chat.

    import subspec
    with subspec.load("qwen2.5-coder-1.5b-instruct", memory_budget="1.78GB") as llm:
        print(llm.generate("def fibonacci(n):", max_tokens=32).text)
        for chunk in llm.stream("def is_prime(n):", max_tokens=32):
            print(chunk.text, end="", flush=True)
        reply = llm.chat([{"role": "user", "content": "Why is the sky blue?"}])
        again = llm.chat([..., {"role": "assistant", "content": reply.text}, ...])

A chat's next turn prefills only what follows the prefix the runtime's cache still holds (the
last call's prompt and reply): `stats.cached_prompt_tokens` says how many it kept.

Every call goes through `stream_generate`, the one generation contract that the CLI, the
server and the bench consume: greedy `generate` equals `subspec generate --json` on the same
prompt and settings. An LLM is not thread-safe: one generation at a time (the server queues
its requests for that reason).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from subspec.config import SamplingConfig
from subspec.errors import SubspecError
from subspec.runtime.generate import stream_generate
from subspec.runtime.logprobs import TokenLogprob
from subspec.runtime.runtime import Request, Runtime
from subspec.runtime.stats import GenerationStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    """New text and its tokens; the last chunk of a stream has `finish_reason` ("stop" or
    "length") and `stats` set."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for


@dataclass(frozen=True)
class Completion:
    """A whole generation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for


class LLM:
    """A model loaded under a memory budget (see `load`). Not thread-safe."""

    def __init__(self, runtime: Runtime, method: str):
        self.runtime, self.method = runtime, method

    def generate(self, prompt: str, **sampling) -> Completion:
        """Generate after a plain prompt (no chat template, as `subspec generate` without
        --chat). `sampling`: max_tokens (256), temperature (0 = greedy), top_p, top_k, seed,
        stop (a string or a list), logprobs (None; k in 0..20: each token's log probability
        under the target's own distribution, and its k most likely alternatives)."""
        return _collect(self.stream(prompt, **sampling))

    def stream(self, prompt: str, **sampling) -> Iterator[Chunk]:
        """`generate`, a Chunk at a time as tokens commit."""
        return self._stream(self.runtime.encode_prompt(prompt, chat=False), **sampling)

    def chat(self, messages: Sequence[dict], **sampling) -> Completion:
        """The assistant's reply to `messages` ([{"role", "content"}], through the model's
        chat template)."""
        return _collect(self.stream_chat(messages, **sampling))

    def stream_chat(self, messages: Sequence[dict], **sampling) -> Iterator[Chunk]:
        """`chat`, a Chunk at a time."""
        from subspec.model.tokenizer import encode_messages

        if not self.runtime.tokenizer.chat_template:
            raise SubspecError("this model has no chat template; use generate")
        return self._stream(encode_messages(self.runtime.tokenizer, list(messages)), **sampling)

    def _stream(self, prompt_ids: list[int], *, max_tokens: int = 256, temperature: float = 0.0,
                top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                stop: str | Sequence[str] = (), logprobs: int | None = None,
                ) -> Iterator[Chunk]:  # fmt: skip
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        if any(not s for s in stops):
            raise SubspecError("stop strings must not be empty")
        config = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        request = Request(prompt_ids, self.method, max_tokens, config, stops, logprobs=logprobs)
        events = stream_generate(self.runtime, request)  # checks the request before running

        def chunks() -> Iterator[Chunk]:
            for ev in events:
                yield Chunk(ev.text, ev.token_ids, ev.finish_reason, ev.stats, ev.logprobs)

        return chunks()

    def forget(self) -> None:
        """Drop the cached conversation (the last call's prompt and output, which the next
        call reuses as far as its prompt begins the same way)."""
        self.runtime.forget()

    def close(self) -> None:
        """Stop the streaming machinery and close its files (idempotent)."""
        self.runtime.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(model: str, memory_budget: str | int | None = None, **options) -> LLM:
    """Load `model` (a catalogue name, a local directory, or dummy:NAME) under `memory_budget`
    ("1.78GB", "900MiB", bytes, "auto", or None: no limit). `options` are the CLI's flags, with
    underscores: method, context, dtype, device, numerics, depth, width, sampling_width,
    max_depth, max_width, draft_temperature, verify_nodes, bits, draft_head_bits,
    no_hqq_optimize, guesses, no_overlap, plain_stream, no_prefix_cache, draft_model, ...
    (`subspec generate --help`), with the same
    defaults; progress=False silences the progress bars. Raises SubspecError for bad input."""
    from subspec.app.options import check_args, model_args, sampling_args

    progress = options.pop("progress", True)
    parser = argparse.ArgumentParser(prog="subspec.load")  # `subspec generate`'s options
    model_args(parser)
    sampling_args(parser)
    args = parser.parse_args(["--model", str(model)])
    unknown = sorted(k for k in options if not hasattr(args, k) or k in _NOT_OPTIONS)
    if unknown:
        raise SubspecError(f"unknown option(s) {', '.join(unknown)}; see subspec generate --help")
    vars(args).update(options)
    args.memory_budget = None if memory_budget is None else str(memory_budget)
    check_args(args)
    return from_args(args, progress)


def from_args(args, progress: bool = True) -> LLM:
    """An LLM from parsed CLI arguments (the CLI's own way in): the drafts --method asks for,
    and subspec by default when the model streams."""
    from subspec.app.options import runtime_config
    from subspec.config import default_method, methods_to_load
    from subspec.runtime.build import build_runtime

    runtime = build_runtime(runtime_config(args, methods_to_load(args.method)), progress)
    streams = runtime.placement.streams
    if args.method == "subspec" and not streams:
        # its substitutes stand in for streamed layers: with none, it would draft with the
        # whole target (on the 1.5B with no budget, 8.6 tok/s against vanilla's 15.7)
        log.warning("nothing streams at this budget, so subspec has nothing to substitute: "
                    "decoding with vanilla")  # fmt: skip
        return LLM(runtime, "vanilla")
    return LLM(runtime, args.method or default_method(runtime.methods, streams))


# generate's own flags, which are arguments of each call rather than options of the model
_NOT_OPTIONS = {"command", "prompt", "chat", "json", "verbose", "max_new_tokens", "temperature",
                "top_p", "top_k", "seed", "stop", "memory_budget"}  # fmt: skip


def _collect(chunks: Iterator[Chunk]) -> Completion:
    pieces, tokens, entries, last = [], [], [], None
    for chunk in chunks:
        pieces.append(chunk.text)
        tokens.extend(chunk.token_ids)
        entries.extend(chunk.logprobs or ())
        last = chunk
    # a stop string may end inside tokens already passed on: keep the ones the stats count
    n = last.stats.new_tokens
    logprobs = entries[:n] if last.logprobs is not None else None
    return Completion("".join(pieces), tokens[:n], last.finish_reason, last.stats, logprobs)

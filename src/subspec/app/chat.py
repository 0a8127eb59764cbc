"""An interactive chat in the terminal: the conversation goes through the chat template on
every turn, the reply streams as it is generated, and a dim statistics line follows it."""

from __future__ import annotations

import contextlib
from contextlib import closing

from rich.console import Console

from subspec.config import SamplingConfig
from subspec.errors import SubspecError
from subspec.model.tokenizer import encode_messages
from subspec.runtime.generate import Event, stream_generate
from subspec.runtime.runtime import Request

PROMPT = ">>> "
HELP = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def run_chat(runtime, sampling: SamplingConfig, args) -> None:
    """Chat with the runtime until /exit or end of input.

    `args` needs max_new_tokens, stop and method (as the CLI's parser and load_runtime set).
    """
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"subspec chat: {runtime.cfg.model} ({args.method}). {HELP}", style="dim")
    messages: list[dict] = []
    while (line := _read_line(console)) is not None:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages.clear()
            console.print("history cleared", style="dim")
        elif text:
            messages.append({"role": "user", "content": text})
            _reply(runtime, sampling, args, messages, console)


def _read_line(console: Console) -> str | None:
    """The next line the user types, or None at end of input; Ctrl-C here only reminds."""
    while True:
        try:
            return input(PROMPT)
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print()
            console.print("(use /exit or Ctrl-D to quit)", style="dim")


def _reply(runtime, sampling, args, messages: list[dict], console: Console) -> None:
    """Stream the assistant's answer to the last user message and add it to the history."""
    prompt = _fit_history(runtime, messages, args.max_new_tokens, console)
    if prompt is None:
        return
    pieces, final = [], None
    try:
        request = Request(prompt, args.method, args.max_new_tokens, sampling, tuple(args.stop))
        with closing(stream_generate(runtime, request)) as events:
            for ev in events:
                print(ev.text, end="", flush=True)
                pieces.append(ev.text)
                final = ev
    except KeyboardInterrupt:
        print()
        console.print("[reply stopped]", style="dim", markup=False)
    except SubspecError as e:
        print()
        console.print(f"error: {e}", style="red", markup=False)
        messages.pop()
        return
    if final is not None and final.stats:
        print()
        console.print(stat_line(final), style="dim", markup=False)
    elif not any(pieces):  # stopped before any text: forget the question too
        messages.pop()
        return
    messages.append({"role": "assistant", "content": "".join(pieces)})


def _fit_history(runtime, messages: list[dict], max_new: int, console: Console) -> list[int] | None:
    """Prompt ids of the conversation, dropping the oldest turns until it fits the context.

    Returns None, and forgets the last message but nothing else, if it is too long alone.
    """
    room = runtime.cfg.context - max_new
    alone = len(encode_messages(runtime.tokenizer, messages[-1:]))
    if alone > room:
        console.print(
            f"that message ({alone} tokens) + {max_new} new tokens does not fit the context "
            f"of {runtime.cfg.context} tokens; try a shorter one",
            style="red", markup=False,
        )  # fmt: skip
        messages.pop()
        return None
    dropped = 0
    while len(ids := encode_messages(runtime.tokenizer, messages)) > room:
        del messages[:2]  # the oldest user turn and its reply
        dropped += 1
    if dropped:
        console.print(f"(dropped the {dropped} oldest turn(s) to fit the context)", style="dim")
    return ids


def stat_line(final: Event) -> str:
    """One line of statistics for a finished reply: tokens, tok/s and tau when present."""
    s = final.stats
    parts = [f"{s.new_tokens} tokens", f"{s.decode_tokens_per_s:.2f} tok/s"]
    if s.spec is not None:
        parts.append(f"tau {s.spec.tau:.2f}")
    if final.finish_reason == "length":
        parts.append("cut at --max-new-tokens")
    return "[" + ", ".join(parts) + "]"

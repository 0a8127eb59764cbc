"""The `subspec` command line: a thin layer mapping flags onto the config dataclasses."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from subspec.app.options import (
    check_args,
    memory_budget,
    model_args,
    sampler_args,
    sampling_args,
    sampling_config,
)
from subspec.config import format_size
from subspec.errors import SubspecError

HELP = argparse.ArgumentDefaultsHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subspec", description=__doc__, formatter_class=HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, formatter_class=HELP)

    gen = add("generate", help="generate text from one prompt")
    model_args(gen)
    sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")

    chat = add("chat", help="interactive chat in the terminal")
    model_args(chat)
    sampling_args(chat)

    serve = add("serve", help="OpenAI-compatible HTTP server")
    model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests that may wait; more get HTTP 503")  # fmt: skip
    serve.add_argument("--max-request-bytes", default="1MiB",
                       help="largest request body; larger ones get HTTP 413")  # fmt: skip
    serve.add_argument("--max-tokens", type=int, default=1024,
                       help="tokens for a request that names no max_tokens (at most the rest "
                       "of the context)")  # fmt: skip

    plan = add("plan", help="show each method's placement under a budget, reading no weights")
    model_args(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    bench = add("bench", help="compare methods side by side")
    model_args(bench)
    bench.add_argument(
        "--methods",
        default="vanilla,hf",
        help="comma list of vanilla, subspec, classic, hf; variants after @ joined by +: "
        "subspec@no-overlap, subspec@depth16, subspec@fast, vanilla@fast",
    )
    bench.add_argument("--dataset", default="mt-bench", help="mt-bench, humaneval, gsm8k, aime2025")
    bench.add_argument("--prompts-file", default=None, help="JSON lines with a 'prompt' field")
    bench.add_argument("--samples", type=int, default=3)
    sampler_args(
        bench,
        seed_help="prompt i is sampled with seed S + i, the same for every "
        "method (outputs_identical_to_vanilla compares tokens under the same seed)",
    )
    bench.add_argument("--max-new-tokens", type=int, default=64)
    bench.add_argument("--out", default="bench.json")
    bench.add_argument("--plot", default=None, metavar="DIR",
                       help="write PNG plots there (needs subspec[plot]: matplotlib)")  # fmt: skip

    models = add("models", help="list or pull the catalogue's models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="show the catalogue and what is pulled")
    pull = msub.add_parser("pull", help="fetch and convert a model")
    pull.add_argument("name")

    cache = add("cache", help="what the offload cache holds; delete what no checkpoint uses")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    csub.add_parser("list", help="each entry: its size, its model, its parts, orphan or not")
    prune = csub.add_parser("prune", help="delete the orphans: entries of checkpoints that "
                            "are gone or changed, or of another cache format")  # fmt: skip
    prune.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    return parser


def load_runtime(args):
    """A runtime with the drafts that --method asks for (subspec by default when streaming);
    settles args.method."""
    from subspec.api import from_args

    llm = from_args(args)
    args.method = llm.method
    if args.verbose:
        print(llm.runtime.placement.summary(), file=sys.stderr)
    return llm.runtime


def cmd_generate(args) -> None:
    from subspec.api import LLM

    sampling = dict(
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    with LLM(load_runtime(args), args.method) as llm:  # the Python API's path
        if args.chat:
            chunks = llm.stream_chat([{"role": "user", "content": args.prompt}], **sampling)
        else:
            chunks = llm.stream(args.prompt, **sampling)
        pieces, tokens, final = [], [], None
        for ev in chunks:
            pieces.append(ev.text)
            tokens.extend(ev.token_ids)
            if not args.json:
                print(ev.text, end="", flush=True)
            final = ev
    s = final.stats
    if args.json:
        stats = {**s.to_dict(), "finish_reason": final.finish_reason}
        tokens = tokens[: s.new_tokens]  # a stop string may end inside tokens already passed on
        print(json.dumps({"text": "".join(pieces), "token_ids": tokens, "stats": stats}))
    else:
        print()
        if args.verbose:
            print(f"[{s.new_tokens} tokens, {s.decode_tokens_per_s:.2f} tok/s, "
                  f"peak RSS {format_size(s.peak_rss_bytes)}, loading "
                  f"{format_size(s.memory.load_peak_rss_bytes)}]", file=sys.stderr)  # fmt: skip


def cmd_models(args) -> None:
    import subspec.hub.models as hub
    from subspec.hub import dummy

    if args.models_command == "pull":  # a dummy is built, a catalogue model fetched
        print(dummy.ensure_dummy(args.name) if dummy.is_dummy(args.name) else hub.pull(args.name))
        return
    for m in hub.list_models():
        state = "ready" if m["ready"] else "not pulled"
        print(f"{m['name']:34} {state:11} {m['arch'].split(',')[0]}")
    for name, entry in dummy.catalog().items():  # random weights, built on first use
        state = "built" if dummy.is_built(dummy.dummy_dir(name)) else "not built"
        print(f"{dummy.PREFIX + name:34} {state:11} {entry['config']['model_type']} (random)")


def cmd_cache(args) -> None:
    from subspec.config import format_size
    from subspec.offload import cache_entries

    if args.cache_command == "prune":
        gone = cache_entries.prune(dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        for e in gone:
            print(f"{verb} {e.path} ({format_size(e.bytes)}, {e.model}): {e.orphan_reason}")
        total = format_size(sum(e.bytes for e in gone))
        print(f"{verb} {len(gone)} orphaned entries, {total}")
        return
    found = cache_entries.entries()
    for e in found:
        state = f"orphan: {e.orphan_reason}" if e.orphan else "in use"
        print(f"{format_size(e.bytes):>10}  {e.path.name}  {e.model}  [{', '.join(e.parts)}]  "
              f"{state}")  # fmt: skip
    total = format_size(sum(e.bytes for e in found))
    print(f"{len(found)} entries under {cache_entries.offload_root()}, {total}")


def cmd_chat(args) -> None:
    from subspec.app.chat import run_chat

    with load_runtime(args) as runtime:
        run_chat(runtime, sampling_config(args), args)


def cmd_serve(args) -> None:
    from subspec.app.server import serve
    from subspec.config import parse_size

    if args.max_queue < 0:
        raise SubspecError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_tokens < 1:
        raise SubspecError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    max_bytes = parse_size(args.max_request_bytes)
    with load_runtime(args) as runtime:  # settles args.method
        serve(runtime, args.host, args.port, args.method, args.max_queue, max_bytes,
              args.max_tokens)  # fmt: skip


def cmd_plan(args) -> None:
    from subspec.app.plan import run_plan

    run_plan(args)


def cmd_bench(args) -> None:
    from subspec.bench.bench import run_bench

    run_bench(args)


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "bench": cmd_bench,
    "plan": cmd_plan,
    "models": cmd_models,
    "cache": cmd_cache,
}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: every `with` closes what it opened


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 1 runtime error, 2 bad input, 130 interrupted."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if hasattr(args, "device"):
            check_args(args)
            if (args.memory_budget or "").strip().lower() == "auto":
                args.memory_budget = str(memory_budget(args))
        COMMANDS[args.command](args)
    except SubspecError as e:
        print(f"subspec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsubspec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure of the runtime, not of the input
        print(f"subspec: error: {type(e).__name__}: {e} (a bug? please report it)",
              file=sys.stderr)  # fmt: skip
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `subspec` command line: a thin layer mapping flags onto the config dataclasses."""

from __future__ import annotations

import argparse
import json
import sys

from .config import SamplingConfig, SpecConfig, format_size, parse_size
from .errors import SubspecError

DEFAULT_MODEL = "smollm2-135m-instruct"


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and memory")
    g.add_argument("--model", default=DEFAULT_MODEL, help="catalogue name, local dir or hub id")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--memory-budget", default=None, help="fast-memory budget, e.g. 1.2GB, 900MiB")
    g.add_argument("--context", type=int, default=4096, help="max prompt + output tokens")
    g.add_argument("--verbose", action="store_true", help="print the placement summary")
    s = p.add_argument_group("speculation")
    s.add_argument("--method", default=None, choices=["vanilla", "subspec", "classic"],
                   help="default: subspec when the model streams, else vanilla")  # fmt: skip
    s.add_argument("--depth", type=int, default=SpecConfig.depth, help="tree depth D")
    s.add_argument("--width", type=int, default=SpecConfig.width, help="tree width k")
    s.add_argument("--draft-temperature", type=float, default=SpecConfig.draft_temperature)
    s.add_argument("--verify-nodes", type=int, default=SpecConfig.verify_nodes,
                   help="verify only the best-scoring nodes of the tree (0 = all)")  # fmt: skip
    s.add_argument("--bits", type=int, default=SpecConfig.bits, help="substitute bit width")
    s.add_argument("--draft-head-bits", type=int, default=SpecConfig.head_bits,
                   help="bit width of the draft's LM head (16 = share the target's)")  # fmt: skip
    s.add_argument("--no-hqq-optimize", action="store_true",
                   help="min-max rounding instead of HQQ's solver (~20x faster)")  # fmt: skip
    s.add_argument("--draft-model", default=None, help="draft model for --method classic")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subspec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from one prompt")
    _model_args(gen)
    _sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")

    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    _model_args(chat)
    _sampling_args(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)

    bench = sub.add_parser("bench", help="compare methods side by side")
    _model_args(bench)
    bench.add_argument(
        "--methods", default="vanilla,hf", help="comma list: vanilla,subspec,classic,hf"
    )
    bench.add_argument("--dataset", default="mt-bench", help="mt-bench, humaneval, gsm8k, aime2025")
    bench.add_argument("--prompts-file", default=None, help="JSON lines with a 'prompt' field")
    bench.add_argument("--samples", type=int, default=3)
    bench.add_argument("--max-new-tokens", type=int, default=64)
    bench.add_argument("--out", default="bench.json")

    models = sub.add_parser("models", help="list or pull the catalogue's models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="show the catalogue and what is pulled")
    pull = msub.add_parser("pull", help="fetch and convert a model")
    pull.add_argument("name")
    return parser


def spec_config(args) -> SpecConfig:
    return SpecConfig(
        depth=args.depth, width=args.width, draft_temperature=args.draft_temperature,
        verify_nodes=args.verify_nodes,
        bits=args.bits, head_bits=args.draft_head_bits, hqq_optimize=not args.no_hqq_optimize,
    )  # fmt: skip


def sampling_config(args) -> SamplingConfig:
    return SamplingConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )


def engine_config(args, methods: tuple[str, ...]):
    from .engine import EngineConfig

    budget = parse_size(args.memory_budget) if args.memory_budget else None
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, memory_budget=budget,
        context=args.context, methods=methods, spec=spec_config(args),
        draft_model=args.draft_model,
    )  # fmt: skip


def load_engine(args):
    """An engine with the drafts that --method asks for (subspec by default when streaming)."""
    from .engine import Engine

    if args.method:
        methods = tuple(dict.fromkeys(("vanilla", args.method)))
    else:
        methods = ("vanilla", "subspec")
    engine = Engine(engine_config(args, methods))
    if args.method is None:
        args.method = "subspec" if engine.placement.streams else "vanilla"
    if args.verbose:
        print(engine.placement.summary(), file=sys.stderr)
    return engine


def cmd_generate(args) -> None:
    from .generate import stream_generate

    sampling = sampling_config(args)
    engine = load_engine(args)
    ids = engine.encode_prompt(args.prompt, args.chat)
    pieces, tokens, final = [], [], None
    for ev in stream_generate(
        engine, ids, method=args.method, max_new_tokens=args.max_new_tokens,
        sampling=sampling, stop=tuple(args.stop),
    ):  # fmt: skip
        pieces.append(ev.text)
        tokens.extend(ev.token_ids)
        if not args.json:
            print(ev.text, end="", flush=True)
        if ev.finish_reason is not None or ev.stats:
            final = ev
    if args.json:
        stats = {**final.stats, "finish_reason": final.finish_reason}
        print(json.dumps({"text": "".join(pieces), "token_ids": tokens, "stats": stats}))
    else:
        print()
        if args.verbose:
            s = final.stats
            print(f"[{s['new_tokens']} tokens, {s['decode_tokens_per_s']:.2f} tok/s, "
                  f"peak RSS {format_size(s['peak_rss_bytes'])}]", file=sys.stderr)  # fmt: skip


def cmd_models(args) -> None:
    from . import dummy, hub

    if args.models_command == "pull":
        print(hub.pull(args.name))
        return
    for m in hub.list_models():
        state = "ready" if m["ready"] else "not pulled"
        print(f"{m['name']:34} {state:11} {m['arch'].split(',')[0]}")
    for name, entry in dummy.catalog().items():  # random weights, built on first use
        state = "built" if dummy.is_built(dummy.dummy_dir(name)) else "not built"
        print(f"{dummy.PREFIX + name:34} {state:11} {entry['config']['model_type']} (random)")


def cmd_chat(args) -> None:
    from .chat import run_chat

    run_chat(load_engine(args), sampling_config(args), args)


def cmd_serve(args) -> None:
    from .server import serve

    engine = load_engine(args)  # settles args.method
    serve(engine, args.host, args.port, method=args.method)


def cmd_bench(args) -> None:
    from .bench import run_bench

    run_bench(args)


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "bench": cmd_bench,
    "models": cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except SubspecError as e:
        print(f"subspec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsubspec: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

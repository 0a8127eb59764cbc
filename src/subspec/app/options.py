"""The flags every command shares, and their mapping onto the config dataclasses."""

from __future__ import annotations

import argparse
import re
import socket
import sys

from subspec.config import (
    DEFAULT_CONTEXT,
    DEFAULT_MODEL,
    DTYPES,
    METHODS,
    NUMERICS,
    RuntimeConfig,
    SamplingConfig,
    SpecConfig,
    format_size,
    parse_size,
)
from subspec.errors import SubspecError
from subspec.memory import auto_budget, auto_margin, available_bytes

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and memory")
    g.add_argument("--model", default=DEFAULT_MODEL, help="catalogue name, local dir or hub id")
    g.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--memory-budget", default=None,
                   help="fast-memory budget, e.g. 1.2GB, 900MiB, or auto (free memory minus "
                   "10%%, at least 1 GiB); default: no limit")  # fmt: skip
    g.add_argument("--context", type=int, default=None,
                   help=f"max prompt + output tokens (default: {DEFAULT_CONTEXT}, or the "
                   "model's max_position_embeddings when smaller)")  # fmt: skip
    g.add_argument("--numerics", default=None, choices=NUMERICS,
                   help="exact: bf16 output identical for every method (default on CPU); "
                   "fast: torch's kernels (default on CUDA)")  # fmt: skip
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole, instead of only what follows the longest "
                   "prefix it shares with the last request's prompt and output")  # fmt: skip
    g.add_argument("--verbose", action="store_true", help="print the placement summary")
    s = p.add_argument_group("speculation")
    s.add_argument("--method", default=None, choices=METHODS,
                   help="default: subspec when the model streams, else vanilla")  # fmt: skip
    s.add_argument("--depth", type=_auto_or_int, default="auto",
                   help="tree depth D, or auto: chosen every round from this machine's measured "
                   "draft, verification and transfer times and the acceptance so far")  # fmt: skip
    s.add_argument("--max-depth", type=int, default=SpecConfig.max_depth,
                   help="the deepest tree --depth auto may choose")  # fmt: skip
    s.add_argument("--max-width", type=int, default=SpecConfig.max_width,
                   help="the widest tree --width auto may choose")  # fmt: skip
    s.add_argument("--width", type=_auto_or_int, default=SpecConfig.width,
                   help="tree width k (2), or auto: chosen with the depth from the same "
                   "figures")  # fmt: skip
    s.add_argument("--sampling-width", type=int, default=SpecConfig.sampling_width,
                   help="tree width of a request that samples (temperature > 0), where "
                   "--width is a number")  # fmt: skip
    s.add_argument("--draft-temperature", type=float, default=SpecConfig.draft_temperature)
    s.add_argument("--verify-nodes", type=int, default=SpecConfig.verify_nodes,
                   help="verify only the best-scoring nodes of the tree (0 = all)")  # fmt: skip
    s.add_argument("--bits", type=int, default=SpecConfig.bits, help="substitute bit width")
    s.add_argument("--draft-head-bits", type=int, default=SpecConfig.head_bits,
                   help="bit width of the draft's LM head (16 = share the target's)")  # fmt: skip
    s.add_argument("--no-hqq-optimize", action="store_true",
                   help="min-max rounding instead of HQQ's solver (~20x faster)")  # fmt: skip
    s.add_argument("--no-overlap", action="store_true",
                   help="no drafting while a verification pass waits for weights")  # fmt: skip
    s.add_argument("--plain-stream", action="store_true",
                   help="stream layers whole (bf16), not as their difference from the "
                   "resident substitutes")  # fmt: skip
    s.add_argument("--guesses", type=int, default=SpecConfig.guesses,
                   help="outcomes the next tree is drafted ahead on, at once")  # fmt: skip
    s.add_argument("--draft-model", default=None, help="draft model for --method classic")


def sampling_args(p: argparse.ArgumentParser) -> None:
    g = sampler_args(p)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampler_args(p: argparse.ArgumentParser, seed_help: str | None = None):
    """--temperature, --top-p, --top-k, --seed (the sampling_config fields); their group."""
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0, help=seed_help)
    return g


def check_args(args) -> None:
    """Refuse flag values the parser cannot check alone (SubspecError, exit 2)."""
    if not _DEVICE.fullmatch(args.device):
        raise SubspecError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if any(not s for s in getattr(args, "stop", ())):
        raise SubspecError("--stop must not be empty")
    if getattr(args, "max_new_tokens", 1) < 1:
        raise SubspecError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.draft_model and args.method != "classic" and "classic" not in _bench_methods(args):
        raise SubspecError("--draft-model is used only by --method classic; add it or drop it")
    if hasattr(args, "port"):
        check_listen(args.host, args.port)


def _bench_methods(args) -> list[str]:
    return getattr(args, "methods", "").split(",")


def check_listen(host: str, port: int) -> None:
    """Refuse a port out of range, a host that does not resolve, or an address in use."""
    if not 0 < port < 65536:
        raise SubspecError(f"--port must be in 1..65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise SubspecError(f"--host {host!r} does not resolve: {e}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise SubspecError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def memory_budget(args) -> int | None:
    """--memory-budget in bytes: a size, `auto` (stated on stderr), or None (no limit)."""
    if args.memory_budget is None:
        return None
    if args.memory_budget.strip().lower() != "auto":
        return parse_size(args.memory_budget)
    free = available_bytes(args.device)
    budget = auto_budget(args.device)
    print(f"subspec: --memory-budget auto = {format_size(budget)} ({format_size(free)} free on "
          f"{args.device} minus a margin of {format_size(auto_margin(free))})",
          file=sys.stderr)  # fmt: skip
    return budget


def spec_config(args) -> SpecConfig:
    return SpecConfig(
        depth=args.depth, max_depth=args.max_depth, width=args.width, max_width=args.max_width,
        sampling_width=args.sampling_width,
        draft_temperature=args.draft_temperature,
        verify_nodes=args.verify_nodes,
        bits=args.bits, head_bits=args.draft_head_bits, hqq_optimize=not args.no_hqq_optimize,
        overlap=not args.no_overlap, guesses=args.guesses,
        residual_stream=not args.plain_stream,
    )  # fmt: skip


def sampling_config(args) -> SamplingConfig:
    return SamplingConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )


def runtime_config(args, methods: tuple[str, ...]) -> RuntimeConfig:
    budget = memory_budget(args)
    return RuntimeConfig(
        model=args.model, dtype=args.dtype, device=args.device, memory_budget=budget,
        context=args.context, methods=methods, spec=spec_config(args),
        draft_model=args.draft_model, numerics=args.numerics,
        prefix_cache=not args.no_prefix_cache,
    )  # fmt: skip


def _auto_or_int(text: str) -> int | None:
    """--depth, --width: a whole number, or auto (None)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or auto, got {text!r}") from None

"""Interleaved A/B of SubSpec settings in one process: the same prompts under each mode in
turn, several rounds, so that the disk's and memory's drift of the minute falls on every mode
alike (a bench runs its methods one after the other, minutes apart).

    python scripts/interleaved.py --rounds 2 \\
        default: \\
        no-overlap:overlap=false \\
        whole-layers:residual_stream=false

A mode is NAME:FIELD=VALUE,... over SpecConfig's fields; modes with the same residual_stream
share one runtime (its streaming is fixed when it is built), the others are set per mode.
"""

from __future__ import annotations

import argparse
import dataclasses

from subspec.config import RuntimeConfig, SamplingConfig, SpecConfig, parse_size
from subspec.hub.datasets import load_prompts
from subspec.runtime.build import build_runtime
from subspec.runtime.generate import stream_generate
from subspec.runtime.runtime import Request


def parse_mode(text: str) -> tuple[str, dict]:
    name, _, fields = text.partition(":")
    spec = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        default = getattr(SpecConfig, key)
        if isinstance(default, bool):
            spec[key] = value.lower() == "true"
        else:  # int or float fields; None-default ones (depth, width) take ints
            spec[key] = type(default)(value) if default is not None else int(value)
    return name, spec


def run(runtime, prompt_ids, max_new: int) -> tuple[float, float]:
    """(decode tok/s, the disk's read rate in GB/s) over the prompts (the first token of each
    comes out of prefill, as in the bench)."""
    tokens = seconds = read_bytes = read_s = 0
    for ids in prompt_ids:
        stats = None
        for event in stream_generate(runtime, Request(ids, "subspec", max_new, SamplingConfig())):
            stats = event.stats or stats
        tokens += stats.new_tokens - 1
        seconds += stats.decode_s
        read_bytes += stats.memory.read_bytes
        read_s += stats.memory.read_s
    return tokens / seconds, read_bytes / read_s / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("modes", nargs="+")
    p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--memory-budget", default="1.78GB")
    p.add_argument("--dataset", default="mt-bench")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    modes = dict(parse_mode(m) for m in args.modes)
    runtimes = {}
    for spec in modes.values():
        residual = spec.get("residual_stream", True)
        if residual not in runtimes:
            cfg = RuntimeConfig(
                model=args.model,
                memory_budget=parse_size(args.memory_budget),
                methods=("subspec",),
                spec=SpecConfig(residual_stream=residual),
            )
            runtimes[residual] = build_runtime(cfg, progress=False)
    first = next(iter(runtimes.values()))
    prompt_ids = [
        first.encode_prompt(p, chat=True) for p in load_prompts(args.dataset, args.samples)
    ]
    base = {key: rt.cfg for key, rt in runtimes.items()}
    for r in range(args.rounds):
        for name, spec in modes.items():
            key = spec.get("residual_stream", True)
            runtime = runtimes[key]
            runtime.cfg = dataclasses.replace(
                base[key], spec=dataclasses.replace(base[key].spec, **spec)
            )
            rate, disk = run(runtime, prompt_ids, args.max_new_tokens)
            print(f"round {r + 1} {name:>16}: {rate:6.2f} tok/s, disk {disk:.2f} GB/s", flush=True)


if __name__ == "__main__":
    main()

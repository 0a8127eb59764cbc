"""`subspec bench`: methods side by side on one model, one prompt set, one budget.

Each method gets its own runtime, planned for the same budget (vanilla does not pay for
substitutes it does not use). A method may carry variants after `@`, joined by `+`:
`subspec@no-overlap`, `subspec@depth16`, `subspec@fast`, `vanilla@fast+width1`. Timings are
decode-phase; the bounds (slow-tier reads timed during the run, memory read bandwidth) are
measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from subspec.app.options import sampling_config
from subspec.bench import report
from subspec.config import METHODS, SamplingConfig
from subspec.errors import SubspecError
from subspec.memory import release_free_memory
from subspec.runtime.generate import stream_generate
from subspec.runtime.runtime import Request

if TYPE_CHECKING:
    from subspec.bench.bandwidth import MemoryProbe

ALL_METHODS = (*METHODS, "hf")  # hf: transformers with accelerate's disk offload
VARIANTS = (
    "no-overlap, plain-stream, exact, fast, depthN, widthN, depthauto, widthauto, guessesN, headN, "
    "dtempX (the draft temperature), swidthN (the sampling width)"
)


def run_bench(args) -> dict:
    """Run the benchmark described by the CLI arguments; print a table, write JSON (and
    plots with --plot DIR)."""
    methods = _methods(args.methods)
    prompts = _prompts(args)
    if "hf" in methods and args.temperature > 0:
        raise SubspecError("the hf baseline decodes greedily: drop hf or --temperature")
    probe = _memory_probe()
    results, bound, prompt_ids = {}, None, None
    for method in methods:
        try:
            results[method], prompt_ids, b = _run_method(args, method, prompts, prompt_ids, probe)
        except SubspecError as e:
            if method == "vanilla":
                raise
            print(f"[{method}] skipped: {e}", file=sys.stderr)
            results[method] = {"error": str(e)}
        bound = bound or b
        gc.collect()
        release_free_memory()  # the last runtime's heap, or the next one's peak RSS counts it
    memory_bw = probe.bytes_per_s
    if bound is not None:
        bound["memory_read_bytes_per_s"] = memory_bw
        bound["memory_read_samples"] = probe.samples
    report.compare(results, bound, memory_bw)
    out = {"config": _config(args, methods, prompts), "bound": bound, "results": results}
    report.print_table(out)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    if getattr(args, "plot", None):
        from subspec.bench.plots import write_plots

        for path in write_plots(out, Path(args.plot)):
            print(f"wrote {path}", file=sys.stderr)
    return out


def _methods(spec: str) -> list[str]:
    """The comma list, checked; vanilla first (every ratio is against it)."""
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    for m in methods:
        base, _, variant = m.partition("@")
        if base not in ALL_METHODS:
            raise SubspecError(f"unknown method {base!r}; choose from {', '.join(ALL_METHODS)}")
        for option in filter(None, variant.split("+")):
            _variant_override(option)  # raises for an unknown variant
    if not methods:
        raise SubspecError(f"--methods names no method; choose from {', '.join(ALL_METHODS)}")
    if "vanilla" not in methods:
        methods.insert(0, "vanilla")
    return methods


def _variant_override(option: str) -> dict:
    """The CLI arguments a variant changes."""
    if option == "no-overlap":
        return {"no_overlap": True}
    if option == "plain-stream":
        return {"plain_stream": True}
    if option in ("exact", "fast"):
        return {"numerics": option}
    if m := re.fullmatch(r"(depth|width)(\d+|auto)", option):
        return {m.group(1): None if m.group(2) == "auto" else int(m.group(2))}
    if m := re.fullmatch(r"guesses(\d+)", option):
        return {"guesses": int(m.group(1))}
    if m := re.fullmatch(r"swidth(\d+)", option):
        return {"sampling_width": int(m.group(1))}
    if m := re.fullmatch(r"dtemp(\d+(?:\.\d+)?)", option):
        return {"draft_temperature": float(m.group(1))}
    if m := re.fullmatch(r"head(\d+)", option):  # the draft LM head's bits (16: the target's)
        return {"draft_head_bits": int(m.group(1))}
    raise SubspecError(f"unknown method variant {option!r}; variants: {VARIANTS}")


def _with_variant(args, method: str) -> tuple[argparse.Namespace, str]:
    """(the arguments for this method's runtime, the base method)."""
    base, _, variant = method.partition("@")
    overrides = {}
    for option in filter(None, variant.split("+")):
        overrides |= _variant_override(option)
    return argparse.Namespace(**{**vars(args), **overrides}), base


def _memory_probe() -> MemoryProbe:
    """A MemoryProbe with its first sample taken."""
    from subspec.bench.bandwidth import MemoryProbe

    probe = MemoryProbe()
    probe.sample()
    return probe


def _run_method(args, method, prompts, prompt_ids, probe):
    """(result, the prompts' token ids, the slow-tier bound if this run measured it)."""
    margs, base = _with_variant(args, method)
    if base == "hf":
        return _run_hf(margs, prompt_ids), prompt_ids, None
    with _runtime(margs, base, method) as runtime:
        prompt_ids = [_encode(runtime, p) for p in prompts]
        sampling = sampling_config(args)
        result = _run_runtime(runtime, base, method, prompt_ids, args.max_new_tokens, sampling,
                              probe)  # fmt: skip
        bound = report.bound(runtime, result) if method == "vanilla" else None
    return result, prompt_ids, bound


def _prompts(args) -> list[str]:
    from subspec.hub.datasets import load_prompts, load_prompts_file

    if args.samples < 1:
        raise SubspecError(f"--samples must be >= 1, got {args.samples}")
    if args.prompts_file:
        return load_prompts_file(args.prompts_file)[: args.samples]
    return load_prompts(args.dataset, args.samples)


def _runtime(args, base: str, label: str):
    from subspec.app.options import runtime_config
    from subspec.runtime.build import build_runtime

    runtime = build_runtime(runtime_config(args, (base,)))
    print(f"[{label}] {runtime.placement.summary()}", file=sys.stderr)
    return runtime


def _encode(runtime, prompt: str) -> list[int]:
    return runtime.encode_prompt(prompt, chat=bool(runtime.tokenizer.chat_template))


def _run_runtime(runtime, base: str, label: str, prompt_ids, max_new: int,
                 sampling: SamplingConfig, probe) -> dict:  # fmt: skip
    """The method's outputs and stats over the prompts, prompt i sampled with `sampling`'s
    seed + i; the memory probe samples after each (the prefetcher may still be finishing its
    ring's reads then, ~0.1 s, while the probe fills its buffer, before it times anything)."""
    outputs, per_prompt = [], []
    for i, ids in enumerate(prompt_ids):
        tokens, stats = [], None
        request = Request(ids, base, max_new, replace(sampling, seed=sampling.seed + i))
        for ev in stream_generate(runtime, request):
            tokens.extend(ev.token_ids)
            stats = ev.stats or stats
        outputs.append(tokens)
        per_prompt.append(stats)
        print(f"[{label}] {stats.new_tokens} tokens, "
              f"{stats.decode_tokens_per_s:.2f} tok/s", file=sys.stderr)  # fmt: skip
        probe.sample()
    return report.aggregate(base, outputs, per_prompt, runtime)


def _run_hf(args, prompt_ids) -> dict:
    from subspec.bench.hf_baseline import run_hf
    from subspec.config import parse_size, torch_dtype
    from subspec.files import cache_root
    from subspec.hub.models import resolve_model
    from subspec.model.tokenizer import load_tokenizer

    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    budget = parse_size(args.memory_budget) if args.memory_budget else None
    offload_dir = cache_root() / "hf-offload"
    dtype = torch_dtype(args.dtype)
    return run_hf(model_dir, prompt_ids, args.max_new_tokens, budget, dtype, offload_dir, eos)


def _config(args, methods, prompts) -> dict:
    keys = ("model", "dtype", "device", "memory_budget", "context", "depth", "width",
            "sampling_width", "draft_temperature", "bits", "draft_model", "dataset",
            "prompts_file", "samples", "max_new_tokens", "numerics", "no_overlap",
            "plain_stream", "temperature", "top_p", "top_k", "seed")  # fmt: skip
    cfg = {k: getattr(args, k, None) for k in keys}
    cfg.update(methods=methods, prompts=prompts, near_tie_bound=report.NEAR_TIE)
    return cfg

"""`subspec bench`: methods side by side on one model, one prompt set, one budget.

Each method gets its own runtime, planned for the same budget (vanilla does not pay for
substitutes it does not use). Timings are decode-phase; the disk bound is measured in the
same run on the same layer files.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from subspec.config import METHODS, SamplingConfig, format_size
from subspec.errors import SubspecError
from subspec.runtime.generate import stream_generate
from subspec.runtime.runtime import Request
from subspec.runtime.stats import GenerationStats

ALL_METHODS = (*METHODS, "hf")  # hf: transformers with accelerate's disk offload
NEAR_TIE = 0.5  # a bf16 divergence is accepted only where the reference's top-2 logit gap is below
WIDE = 132  # columns of the results table when stdout is not a terminal


def run_bench(args) -> dict:
    """Run the benchmark described by the CLI arguments; print a table, write JSON."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise SubspecError(f"unknown method {bad[0] if bad else ''!r}; choose from {ALL_METHODS}")
    if "vanilla" not in methods:
        methods.insert(0, "vanilla")  # every ratio is against vanilla
    prompts = _prompts(args)
    results, bound, prompt_ids = {}, None, None
    for method in methods:
        try:
            results[method], prompt_ids, b = _run_method(args, method, prompts, prompt_ids)
        except SubspecError as e:
            if method == "vanilla":
                raise
            print(f"[{method}] skipped: {e}", file=sys.stderr)
            results[method] = {"error": str(e)}
        bound = bound or b
        gc.collect()
    _compare(results)
    report = {"config": _config(args, methods, prompts), "bound": bound, "results": results}
    _print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return report


def _run_method(args, method, prompts, prompt_ids):
    """(result, the prompts' token ids, the disk bound if this run measured it)."""
    if method == "hf":
        return _run_hf(args, prompt_ids), prompt_ids, None
    with _runtime(args, method) as runtime:
        prompt_ids = [_encode(runtime, p) for p in prompts]
        result = _run_runtime(runtime, method, prompt_ids, args.max_new_tokens)
        bound = _bound(runtime, result) if method == "vanilla" else None
    return result, prompt_ids, bound


def _prompts(args) -> list[str]:
    from subspec.hub.datasets import load_prompts, load_prompts_file

    if args.samples < 1:
        raise SubspecError(f"--samples must be >= 1, got {args.samples}")
    if args.prompts_file:
        return load_prompts_file(args.prompts_file)[: args.samples]
    return load_prompts(args.dataset, args.samples)


def _runtime(args, method: str):
    from subspec.app.options import runtime_config
    from subspec.runtime.build import build_runtime

    runtime = build_runtime(runtime_config(args, (method,)))
    print(f"[{method}] {runtime.placement.summary()}", file=sys.stderr)
    return runtime


def _encode(runtime, prompt: str) -> list[int]:
    return runtime.encode_prompt(prompt, chat=bool(runtime.tokenizer.chat_template))


def _run_runtime(runtime, method: str, prompt_ids: list[list[int]], max_new: int) -> dict:
    outputs, per_prompt = [], []
    for ids in prompt_ids:
        tokens, stats = [], None
        for ev in stream_generate(runtime, Request(ids, method, max_new, SamplingConfig())):
            tokens.extend(ev.token_ids)
            stats = ev.stats or stats
        outputs.append(tokens)
        per_prompt.append(stats)
        print(f"[{method}] {stats.new_tokens} tokens, "
              f"{stats.decode_tokens_per_s:.2f} tok/s", file=sys.stderr)  # fmt: skip
    return _aggregate(method, outputs, per_prompt, runtime)


def _aggregate(method, outputs, per_prompt: list[GenerationStats], runtime) -> dict:
    decode_tokens = sum(s.decode_tokens for s in per_prompt)
    decode_s = sum(s.decode_s for s in per_prompt)
    forwards = sum(s.target_forwards for s in per_prompt)
    result = {
        "tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
        "decode_tokens": decode_tokens,
        "decode_s": decode_s,
        "prefill_s": sum(s.prefill_s for s in per_prompt),
        "target_forwards": forwards,
        "tau": decode_tokens / forwards if forwards else 0.0,
        "peak_rss_bytes": max(s.peak_rss_bytes for s in per_prompt),
        "device_peak_bytes": max((s.device_peak_bytes or 0) for s in per_prompt) or None,
        "bytes_streamed": sum(s.memory.bytes_streamed for s in per_prompt),
        "transfer_wait_s": sum(s.memory.transfer_wait_s for s in per_prompt),
        "resident_bytes": runtime.placement.resident_bytes,
        "placement": runtime.placement.to_dict(),
        "outputs": outputs,
        "per_prompt": [s.to_dict() for s in per_prompt],
    }
    if method != "vanilla":
        result["draft_s"] = sum(s.spec.draft_s for s in per_prompt)
        result["verify_s"] = sum(s.spec.verify_s for s in per_prompt)
        result["accept_lengths"] = [a for s in per_prompt for a in s.spec.accept_lengths]
    return result


def _bound(runtime, vanilla: dict) -> dict | None:
    """Tokens/s if a decode pass cost exactly its streamed bytes at the measured rate of the
    slow tier (disk reads on CPU, pinned host -> device copies on CUDA)."""
    from subspec.bench.bandwidth import measure_slow_tier_bandwidth

    if not runtime.placement.streams or not vanilla["target_forwards"]:
        return None
    per_token = vanilla["bytes_streamed"] / sum(
        s["target_forwards"] + 1 + (s["prompt_tokens"] - 1) // runtime.cfg.prefill_chunk
        for s in vanilla["per_prompt"]
    )  # every pass (prefill chunks included) streams the same layers
    store = runtime.streaming.prefetcher.store
    bandwidth = measure_slow_tier_bandwidth(store, 512 << 20, runtime.target.device)
    return {
        "disk_read_bytes_per_s": bandwidth,  # the slow tier's rate, whatever it is
        "slow_tier_bytes_per_s": bandwidth,
        "streamed_bytes_per_token": per_token,
        "tokens_per_s": bandwidth / per_token,
        "store_mode": runtime.streaming.store_mode,
    }


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


def _compare(results: dict) -> None:
    """Speedups against vanilla, and whether each method's greedy outputs equal vanilla's."""
    ref = results["vanilla"]
    for r in results.values():
        if "error" in r:
            continue
        r["speedup_vs_vanilla"] = (
            r["tokens_per_s"] / ref["tokens_per_s"] if ref["tokens_per_s"] else 0
        )
        diverged = [
            _divergence(i, out, want, ref["per_prompt"][i].get("top2_margins", []))
            for i, (out, want) in enumerate(zip(r["outputs"], ref["outputs"], strict=True))
            if out != want
        ]
        r["outputs_identical_to_vanilla"] = not diverged
        r["divergences"] = diverged
        r["divergences_at_near_tie"] = sum(d["near_tie"] for d in diverged)


def _divergence(prompt: int, out: list[int], want: list[int], margins: list[float]) -> dict:
    at = next(
        (i for i, (a, b) in enumerate(zip(out, want, strict=False)) if a != b),
        min(len(out), len(want)),
    )
    margin = margins[at] if at < len(margins) else None
    return {"prompt": prompt, "token": at, "reference_top2_gap": margin,
            "near_tie": margin is not None and margin < NEAR_TIE}  # fmt: skip


def _config(args, methods, prompts) -> dict:
    keys = ("model", "dtype", "device", "memory_budget", "context", "depth", "width",
            "draft_temperature", "bits", "draft_model", "dataset", "prompts_file", "samples",
            "max_new_tokens")  # fmt: skip
    cfg = {k: getattr(args, k, None) for k in keys}
    cfg.update(methods=methods, prompts=prompts, near_tie_bound=NEAR_TIE)
    return cfg


def _print_table(report: dict) -> None:
    table = Table(title=f"subspec bench: {report['config']['model']}, "
                        f"budget {report['config']['memory_budget']}")  # fmt: skip
    for col in ("method", "tok/s", "speedup", "tau", "identical", "peak RSS", "draft s",
                "verify s", "wait s"):  # fmt: skip
        table.add_column(col, justify="right")
    for name, r in report["results"].items():
        if "error" in r:
            table.add_row(name, "failed", "", "", "", "", "", "", "")
            continue
        same = "yes" if r["outputs_identical_to_vanilla"] else (
            f"no ({len(r['divergences'])}, {r['divergences_at_near_tie']} near-tie)")  # fmt: skip
        table.add_row(
            name, f"{r['tokens_per_s']:.2f}", f"{r['speedup_vs_vanilla']:.2f}x",
            f"{r['tau']:.2f}" if name not in ("vanilla", "hf") else "1",
            same, format_size(r["peak_rss_bytes"]),
            *(f"{r[k]:.1f}" if k in r else "" for k in ("draft_s", "verify_s", "transfer_wait_s")),
        )  # fmt: skip
    b = report["bound"]
    if b:
        table.add_row("disk bound", f"{b['tokens_per_s']:.2f}", "", "", "", "", "", "", "")
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDE)  # piped or redirected: do not squeeze the columns
    console.print(table)
    if b:
        share = report["results"]["vanilla"]["tokens_per_s"] / b["tokens_per_s"]
        print(f"disk {format_size(b['disk_read_bytes_per_s'])}/s ({b['store_mode']}), "
              f"{format_size(b['streamed_bytes_per_token'])} streamed per pass; "
              f"vanilla at {share:.0%} of the bound")  # fmt: skip

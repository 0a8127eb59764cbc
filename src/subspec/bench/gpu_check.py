"""One machine check of the GPU path (scripts/gpu-check): kernels, prefetch ordering,
lossless decoding with host-sync counts, slow-tier bandwidth, and a real-shape run.

Each step returns ("passed" | "failed" | "skipped", details); a step that needs CUDA is
skipped on a CPU with its reason, never passed. The report is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from subspec.config import RuntimeConfig, SamplingConfig, SpecConfig, parse_size
from subspec.errors import SubspecError
from subspec.runtime.build import build_runtime
from subspec.runtime.generate import stream_generate
from subspec.runtime.runtime import Request

PROMPT = "Why is the sky blue?"
# (out, in, group sizes): in % 128 == 0 -> 8 inner k tiles, % 64 -> 4, % 32 -> 2
INT4_SHAPES = [(64, 1024, (32, 64, 128, 256)), (48, 192, (32, 64)), (32, 96, (32,))]


def check_int4_layout(device: torch.device) -> tuple[str, dict]:
    """Every int4 layout case against the dequantize reference: exact unpacking, and the
    matmul within bf16 rounding. On CUDA this is torch's tiled int4pack; on CPU, the CPU's."""
    from subspec.quant.linear import QuantLinear

    gen = torch.Generator().manual_seed(0)
    worst, layouts, cases = 0.0, set(), 0
    for out_f, in_f, groups in INT4_SHAPES:
        for group in groups:
            for bits in (2, 3, 4):
                q = torch.randint(0, 2**bits, (out_f, in_f), generator=gen, dtype=torch.uint8)
                sz = (torch.randn(in_f // group, out_f, 2, generator=gen) * 0.05).bfloat16()
                lin = QuantLinear(q.to(device), sz.to(device), None, bits=bits, group_size=group)
                layouts.add(lin.layout)
                if not torch.equal(lin.unpacked().cpu(), q):
                    return "failed", {"case": [out_f, in_f, group, bits], "why": "unpack differs"}
                for rows in (1, 7, 33):
                    x = torch.randn(rows, in_f, generator=gen).bfloat16().to(device)
                    ref = x.float() @ lin.dequantize().T
                    err = float((lin(x).float() - ref).abs().max() / ref.abs().max())
                    worst, cases = max(worst, err), cases + 1
    status = "passed" if worst < 2e-2 else "failed"
    return status, {"cases": cases, "max_rel_error": worst, "layouts": sorted(layouts)}


def check_prefetch_ordering(device: torch.device) -> tuple[str, dict]:
    """The prefetcher stress test and its control (ordering removed), which must fail."""
    if device.type != "cuda":
        return "skipped", {"reason": "needs CUDA: the ordering exists only for async copies"}
    from subspec.offload.stress import prefetch_stress

    ordered = prefetch_stress(device, ordered=True)
    control = prefetch_stress(device, ordered=False)
    ok = ordered == 0 and control > 0
    return ("passed" if ok else "failed"), {"bad_reads": ordered, "control_bad_reads": control}


def measure_bandwidth(device: torch.device) -> tuple[str, dict]:
    """Pinned host -> device copy rate with 256 MiB units."""
    if device.type != "cuda":
        return "skipped", {"reason": "needs CUDA: pinned host -> device copies"}
    import functools

    from subspec.bench.bandwidth import measure_host_to_device_bandwidth
    from subspec.offload.stores import PinnedHostStore

    def unit(i):
        return {"data": torch.full((256 << 20,), i, dtype=torch.uint8)}

    store = PinnedHostStore({i: functools.partial(unit, i) for i in range(4)})
    try:
        rate = measure_host_to_device_bandwidth(store, 4 << 30, device)
    finally:
        store.close()
    return "passed", {"bytes_per_s": rate}


def generate(runtime, method: str, max_new: int, sampling=None) -> tuple[list[int], object]:
    """(token ids, final GenerationStats) of one chat prompt."""
    ids = runtime.encode_prompt(PROMPT, chat=bool(runtime.tokenizer.chat_template))
    tokens, stats = [], None
    request = Request(ids, method, max_new, sampling or SamplingConfig())
    for ev in stream_generate(runtime, request):
        tokens.extend(ev.token_ids)
        stats = ev.stats or stats
    return tokens, stats


def counting_syncs(device: torch.device, fn):
    """(fn(), host syncs it caused): CUDA's sync debug mode warns on each; None on CPU."""
    if device.type != "cuda":
        return fn(), None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught)


def streaming_budget(target: Path, draft: Path | None, base: RuntimeConfig) -> int:
    """A budget that streams most layers: everything resident, less 0.4 layer (the staging
    buffers then cost two layers, so about one layer stays resident)."""
    full = build_runtime(replace(base, model=str(target), methods=("vanilla",)), progress=False)
    p = full.placement
    full.close()
    extra = 0
    if draft is not None:
        # built as classic's draft is: embedding rows read on demand
        d_cfg = replace(base, model=str(draft), methods=("vanilla",), map_embeddings=True)
        d = build_runtime(d_cfg, progress=False)
        extra = d.placement.resident_bytes - d.placement.breakdown.get("workspace", 0)
        d.close()
    layer = p.breakdown["resident_layers"] // len(p.resident_layers)
    return p.resident_bytes + extra - int(0.4 * layer)


def check_lossless(device: torch.device, workdir: Path) -> tuple[str, dict]:
    """Greedy fp32 output of vanilla, subspec and classic with layers streaming equals
    all-resident vanilla; sampling is seed-exact. Host syncs per speculative round counted."""
    from subspec.bench.tiny_model import write_tiny_llama

    target = write_tiny_llama(workdir / "tiny-target", layers=4, seed=1)
    draft = write_tiny_llama(workdir / "tiny-draft", layers=1, seed=2)
    base = RuntimeConfig(
        model=str(target), dtype="float32", device=device.type, context=256,
        spec=SpecConfig(depth=4, width=2, hqq_optimize=False),
    )  # fmt: skip
    full = build_runtime(base, progress=False)
    reference, _ = generate(full, "vanilla", 24)
    full.close()
    cfg = replace(base, memory_budget=streaming_budget(target, draft, base),
                  methods=("vanilla", "subspec", "classic"), draft_model=str(draft))  # fmt: skip
    details, ok = {"reference_tokens": len(reference)}, True
    with build_runtime(cfg, progress=False) as rt:
        details["streamed_layers"] = len(rt.placement.streamed_layers)
        if not rt.placement.streams:
            details["reason"] = "nothing streams at the chosen budget"
        for method in ("vanilla", "subspec", "classic"):
            (tokens, stats), syncs = counting_syncs(device, lambda m=method: generate(rt, m, 24))
            same = tokens == reference
            ok &= same and bool(rt.placement.streamed_layers)
            rounds = len(stats.spec.accept_lengths) if stats.spec else stats.target_forwards
            per_round = syncs and syncs / max(rounds, 1)
            tau = stats.spec and stats.spec.tau
            details[method] = {"identical": same, "tau": tau, "host_syncs_per_round": per_round}
        sampling = SamplingConfig(temperature=0.8, top_p=0.95, top_k=50, seed=7)
        draws = [generate(rt, "subspec", 24, sampling)[0] for _ in range(2)]
        vanilla_draw, _ = generate(rt, "vanilla", 24, sampling)
        ok &= draws[0] == draws[1] and len(vanilla_draw) > 0
        details["sampling_seed_exact"] = draws[0] == draws[1]
    return ("passed" if ok else "failed"), details


def run_model(args, device: torch.device, workdir: Path) -> tuple[str, dict]:
    """Vanilla and subspec on the model under the budget: speeds, the transfer bound, the
    speculative round's parts."""
    from subspec.bench.bandwidth import measure_slow_tier_bandwidth
    from subspec.bench.tiny_model import write_tiny_llama

    model = args.model or (
        "dummy:qwen2.5-7b" if device.type == "cuda" else str(write_tiny_llama(workdir / "m"))
    )
    spec = SpecConfig(depth=args.depth, width=args.width, hqq_optimize=False)
    base = RuntimeConfig(model=model, dtype=args.dtype, device=device.type, context=512, spec=spec)
    budget = parse_size(args.budget) if args.budget else streaming_budget(Path(model), None, base)
    cfg = replace(base, memory_budget=budget, methods=("vanilla", "subspec"))
    with build_runtime(cfg, progress=not args.quiet) as rt:
        generate(rt, "vanilla", 2)  # warm-up: kernels, allocator
        _, vanilla = generate(rt, "vanilla", args.tokens)
        _, sub = generate(rt, "subspec", args.tokens)
        store = rt.streaming.prefetcher.store if rt.streaming else None
        bandwidth = store and measure_slow_tier_bandwidth(store, 256 << 20, device)
        streamed = rt.placement.streams
    if not streamed:
        return "failed", {"reason": f"nothing streams at budget {budget}"}
    per_token = vanilla.memory.bytes_streamed / max(vanilla.target_forwards + 1, 1)
    s, rounds = sub.spec, max(len(sub.spec.accept_lengths), 1)
    return "passed", {
        "model": model, "budget_bytes": budget, "dtype": args.dtype,
        "vanilla_tokens_per_s": vanilla.decode_tokens_per_s,
        "streamed_bytes_per_token": per_token, "slow_tier_bytes_per_s": bandwidth,
        "transfer_bound_tokens_per_s": bandwidth / per_token,
        "device_peak_bytes": max(vanilla.device_peak_bytes or 0, sub.device_peak_bytes or 0)
        or None,
        "subspec": {
            "tokens_per_s": sub.decode_tokens_per_s, "tau": s.tau, "rounds": rounds,
            "depth": s.depth, "width": s.width, "tree_size": 1 + round(s.depth * s.width),
            "draft_step_s": (s.draft_s + s.overlap_s) / max(s.draft_steps, 1),
            "overlap_s": s.overlap_s / rounds, "verify_s": s.verify_s / rounds,
            "transfer_wait_s": sub.memory.transfer_wait_s / rounds,
            "round_s": sub.decode_s / rounds,
            "speedup_vs_vanilla": sub.decode_tokens_per_s / vanilla.decode_tokens_per_s,
        },
    }  # fmt: skip


def run_steps(args, device: torch.device) -> dict:
    """Every step, each timed and isolated: a failing step reports its error and the next
    one runs."""
    steps = {
        "int4_layout": lambda d, w: check_int4_layout(d),
        "prefetch_ordering": lambda d, w: check_prefetch_ordering(d),
        "lossless": check_lossless,
        "bandwidth": lambda d, w: measure_bandwidth(d),
        "model_run": lambda d, w: run_model(args, d, w),
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name, step in steps.items():
            start = time.perf_counter()
            try:
                status, details = step(device, Path(tmp))
            except (SubspecError, RuntimeError, ValueError, OSError) as e:
                status, details = "failed", {"error": f"{type(e).__name__}: {e}"}
            details["seconds"] = round(time.perf_counter() - start, 2)
            results[name] = {"status": status, **details}
    return results


def report(device: torch.device, steps: dict) -> dict:
    """The JSON record: the steps, their counts and the headline numbers."""
    run = steps["model_run"]
    counts = {
        s: sum(r["status"] == s for r in steps.values()) for s in ("passed", "failed", "skipped")
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name, "torch": torch.__version__,
        "tests_passed": counts["passed"], "tests_failed": counts["failed"],
        "tests_skipped": counts["skipped"],
        "vanilla_tokens_per_s": run.get("vanilla_tokens_per_s"),
        "transfer_bound_tokens_per_s": run.get("transfer_bound_tokens_per_s"),
        "h2d_bytes_per_s": steps["bandwidth"].get("bytes_per_s"),
        "subspec": run.get("subspec"), "steps": steps,
    }  # fmt: skip


def print_table(rep: dict) -> None:
    """A short plain-text table of the steps and the headline numbers."""
    print(f"gpu-check on {rep['device']} (torch {rep['torch']})")
    for name, r in rep["steps"].items():
        why = r.get("reason") or r.get("error") or ""
        print(f"  {name:<18} {r['status']:<8} {r['seconds']:>7.2f} s  {why}")
    sub = rep["subspec"] or {}
    for label, value in [
        ("vanilla tok/s", rep["vanilla_tokens_per_s"]),
        ("transfer bound tok/s", rep["transfer_bound_tokens_per_s"]),
        ("subspec tok/s", sub.get("tokens_per_s")), ("subspec tau", sub.get("tau")),
        ("round s", sub.get("round_s")), ("draft step s", sub.get("draft_step_s")),
        ("verify s", sub.get("verify_s")), ("transfer wait s", sub.get("transfer_wait_s")),
    ]:  # fmt: skip
        print(f"  {label:<22} {'-' if value is None else f'{value:.4g}'}")
    print(f"  passed {rep['tests_passed']}, failed {rep['tests_failed']}, "
          f"skipped {rep['tests_skipped']}")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", help="model for the real-shape run (cuda: dummy:qwen2.5-7b; "
                   "cpu: a tiny random model)")  # fmt: skip
    p.add_argument("--budget", help="memory budget of that run (cuda: 8GB; cpu: streaming)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--tokens", type=int, default=16, help="new tokens per generation")
    p.add_argument("--depth", type=int, help="tree depth (cuda: 48, cpu: 16)")
    p.add_argument("--width", type=int, help="tree width (cuda: 6, cpu: 2)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.budget = args.budget or ("8GB" if cuda else None)
    args.depth = args.depth or (48 if cuda else 16)
    args.width = args.width or (6 if cuda else 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    rep = report(device, run_steps(args, device))
    print_table(rep)
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=2))
    return 1 if rep["tests_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

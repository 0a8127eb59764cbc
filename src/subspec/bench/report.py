"""The bench's figures: one method's aggregate over the prompts, the bounds of this run,
the comparison against vanilla, and the table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from subspec.config import format_size
from subspec.runtime.stats import GenerationStats

NEAR_TIE = 0.5  # a bf16 divergence is accepted only where the reference's top-2 logit gap is below
WIDE = 160  # columns of the results table when stdout is not a terminal


def aggregate(method, outputs, per_prompt: list[GenerationStats], runtime) -> dict:
    """One method's figures over all prompts (`method`: the base method, without variants)."""
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
        "numerics": "exact" if runtime.cfg.exact else "fast",
        "peak_rss_bytes": max(s.peak_rss_bytes for s in per_prompt),
        "device_peak_bytes": max((s.device_peak_bytes or 0) for s in per_prompt) or None,
        "bytes_streamed": sum(s.memory.bytes_streamed for s in per_prompt),
        "transfer_wait_s": sum(s.memory.transfer_wait_s for s in per_prompt),
        "read_bytes": sum(s.memory.read_bytes for s in per_prompt),
        "read_s": sum(s.memory.read_s for s in per_prompt),
        "passes": sum(_passes(s, runtime.cfg.prefill_chunk) for s in per_prompt),
        "resident_bytes": runtime.placement.resident_bytes,
        "placement": runtime.placement.to_dict(),
        "outputs": outputs,
        "per_prompt": [s.to_dict() for s in per_prompt],
    }
    if method != "vanilla":
        result.update(_spec_figures(per_prompt, runtime))
    return result


def _passes(s: GenerationStats, chunk: int) -> int:
    """Target passes of one request, prefill chunks included: each streams the same layers."""
    return s.target_forwards + 1 + (s.prompt_tokens - 1) // chunk


def _spec_figures(per_prompt: list[GenerationStats], runtime) -> dict:
    specs = [s.spec for s in per_prompt]
    rounds = sum(len(x.accept_lengths) for x in specs)
    draft_s = sum(x.draft_s for x in specs)
    overlap_s = sum(x.overlap_s for x in specs)
    steps = sum(x.draft_steps for x in specs)
    ahead = sum(x.ahead_steps for x in specs)
    depths = [d for x in specs for d in x.depths]
    widths = [k for x in specs for k in x.widths]
    step_s = (draft_s + overlap_s) / steps if steps else 0.0
    step_bytes = draft_bytes_per_step(runtime)
    return {
        "draft_s": draft_s,
        "verify_s": sum(x.verify_s for x in specs),
        "overlap_s": overlap_s,
        "round_s": sum(s.decode_s for s in per_prompt) / rounds if rounds else 0.0,
        "rounds": rounds,
        "draft_steps": steps,
        "draft_step_s": step_s,
        "draft_bytes_per_step": step_bytes,
        "draft_read_bytes_per_s": step_bytes / step_s if step_s else 0.0,
        # the same split: steps in the open (a tree's frontier) and drafted ahead (every
        # guess's frontier in one step, beside the pass's compute and reads; parts of
        # levels left unfinished count in its time)
        "open_step_s": draft_s / (steps - ahead) if steps > ahead else 0.0,
        "ahead_step_s": overlap_s / ahead if ahead else 0.0,
        "lookahead_hits": sum(x.lookahead_hits for x in specs),
        "depth": sum(depths) / len(depths) if depths else 0.0,
        "width": sum(widths) / len(widths) if widths else 0.0,
        "accept_lengths": [a for x in specs for a in x.accept_lengths],
        "depths": depths,  # each round's, beside its accepted length
        "round_parts": [r for x in specs for r in x.rounds],
    }


def draft_bytes_per_step(runtime) -> int:
    """Weight bytes one draft step reads: the resident layers it shares (unless it has their
    substitutes), the substitutes and its LM head (SubSpec), or the whole draft model
    (classic)."""
    placement = runtime.placement
    parts = placement.breakdown
    if "classic" in runtime.drafters:
        return parts.get("extra", 0)
    head = parts.get("draft_lm_head") or parts.get("lm_head", 0)
    shared = 0 if placement.substitutes_everywhere else parts.get("resident_layers", 0)
    return shared + parts.get("substitutes", 0) + head


def bound(runtime, vanilla: dict) -> dict | None:
    """Tokens/s if a decode pass cost exactly its streamed bytes at the rate the slow tier
    delivered in this run (the prefetcher times every read), beside a separate cold probe."""
    from subspec.bench.bandwidth import measure_slow_tier_bandwidth

    if not runtime.placement.streams or not vanilla["target_forwards"] or not vanilla["read_s"]:
        return None
    per_token = vanilla["bytes_streamed"] / vanilla["passes"]
    timed = vanilla["read_bytes"] / vanilla["read_s"]
    store = runtime.streaming.prefetcher.store
    probe = measure_slow_tier_bandwidth(store, 512 << 20, runtime.target.device)
    return {
        "slow_tier_bytes_per_s": timed,  # the reads of this run, as timed by the prefetcher
        "disk_read_bytes_per_s": timed,
        "probe_bytes_per_s": probe,  # a separate cold read of the same files
        "streamed_bytes_per_token": per_token,
        "tokens_per_s": timed / per_token,
        "store_mode": runtime.streaming.store_mode,
    }


def compare(results: dict, bound: dict | None, memory_bw: float) -> None:
    """Speedups against vanilla, greedy outputs against the vanilla of the same numerics,
    and each speculative method's limit under a perfect overlap."""
    ref = results["vanilla"]
    for r in results.values():
        if "error" in r:
            continue
        r["speedup_vs_vanilla"] = (
            r["tokens_per_s"] / ref["tokens_per_s"] if ref["tokens_per_s"] else 0
        )
        same = _reference(results, r)
        r["reference"] = same
        want = results[same]
        diverged = [
            _divergence(i, out, good, want["per_prompt"][i].get("top2_margins", []))
            for i, (out, good) in enumerate(zip(r["outputs"], want["outputs"], strict=True))
            if out != good
        ]
        r["outputs_identical_to_vanilla"] = not diverged
        r["divergences"] = diverged
        r["divergences_at_near_tie"] = sum(d["near_tie"] for d in diverged)
        if "rounds" in r:
            _limits(r, bound, memory_bw)


def _reference(results: dict, r: dict) -> str:
    """The vanilla run with r's numerics, when the bench has one; else plain vanilla."""
    for name, other in results.items():
        if name.startswith("vanilla") and other.get("numerics") == r.get("numerics"):
            return name
    return "vanilla"


def _limits(r: dict, bound: dict | None, memory_bw: float) -> None:
    """limit_tokens_per_s = tau / max(stream time, draft time) per round, from this run: what
    a perfect overlap would reach. cpu_limit_tokens_per_s = tau / max(stream time, draft time
    + the pass's own compute): the same where the draft and the pass's compute share the
    cores (on CPU both run on all of them), so that only the transfer can hide behind work."""
    rate = r["read_bytes"] / r["read_s"] if r["read_s"] else (bound or {}).get("tokens_per_s")
    stream_s = (r["bytes_streamed"] / r["passes"]) / rate if rate and r["passes"] else 0.0
    draft_s = (r["draft_s"] + r["overlap_s"]) / r["rounds"] if r["rounds"] else 0.0
    r["stream_s_per_round"] = stream_s
    r["draft_s_per_round"] = draft_s
    slowest = max(stream_s, draft_s)
    r["limit_tokens_per_s"] = r["tau"] / slowest if slowest else 0.0
    r["share_of_limit"] = r["tokens_per_s"] / r["limit_tokens_per_s"] if slowest else 0.0
    # the pass's time neither waiting for weights nor drafting in its waits (transfer_wait_s
    # also holds prefill's waits: compute comes out a little short, the limit a little high)
    compute_s = max(r["verify_s"] - r["transfer_wait_s"], 0.0) / r["rounds"] if r["rounds"] else 0.0
    r["pass_compute_s_per_round"] = compute_s
    busiest = max(stream_s, draft_s + compute_s)
    r["cpu_limit_tokens_per_s"] = r["tau"] / busiest if busiest else 0.0
    r["share_of_cpu_limit"] = r["tokens_per_s"] / r["cpu_limit_tokens_per_s"] if busiest else 0.0
    r["draft_step_share_of_memory_bw"] = r["draft_read_bytes_per_s"] / memory_bw
    if r.get("open_step_s"):
        r["open_step_share_of_memory_bw"] = r["draft_bytes_per_step"] / r["open_step_s"] / memory_bw


def _divergence(prompt: int, out: list[int], want: list[int], margins: list[float]) -> dict:
    at = next(
        (i for i, (a, b) in enumerate(zip(out, want, strict=False)) if a != b),
        min(len(out), len(want)),
    )
    margin = margins[at] if at < len(margins) else None
    return {"prompt": prompt, "token": at, "reference_top2_gap": margin,
            "near_tie": margin is not None and margin < NEAR_TIE}  # fmt: skip


COLUMNS = ("method", "tok/s", "speedup", "tau", "identical", "peak RSS", "depth", "round s",
           "draft s", "overlap s", "verify s", "wait s", "limit tok/s", "step ms")  # fmt: skip


def _row(name: str, r: dict) -> list[str]:
    if "error" in r:
        return [name, "failed"] + [""] * (len(COLUMNS) - 2)
    same = "yes" if r["outputs_identical_to_vanilla"] else (
        f"no ({len(r['divergences'])}, {r['divergences_at_near_tie']} near-tie)")  # fmt: skip
    spec = "rounds" in r
    tau = f"{r['tau']:.2f}" if spec else "1"
    cells = [name, f"{r['tokens_per_s']:.2f}", f"{r['speedup_vs_vanilla']:.2f}x", tau, same,
             format_size(r["peak_rss_bytes"])]  # fmt: skip
    if not spec:
        wait = r.get("transfer_wait_s")
        return cells + [""] * 5 + ["" if wait is None else f"{wait:.1f}", "", ""]
    return cells + [
        f"{r['depth']:.1f}x{r['width']:.1f}", f"{r['round_s']:.2f}", f"{r['draft_s']:.1f}",
        f"{r['overlap_s']:.1f}", f"{r['verify_s']:.1f}", f"{r['transfer_wait_s']:.1f}",
        f"{r['limit_tokens_per_s']:.2f}", f"{r['draft_step_s'] * 1e3:.0f}",
    ]  # fmt: skip


def _split(r: dict) -> str:
    """', in the open 38 ms (66%), ahead 52 ms': the draft step's mean split, when both ran."""
    if not (r.get("open_step_s") and r.get("ahead_step_s")):
        return ""
    share = r["open_step_share_of_memory_bw"]
    return (f", in the open {r['open_step_s'] * 1e3:.0f} ms ({share:.0%}), "
            f"ahead {r['ahead_step_s'] * 1e3:.0f} ms")  # fmt: skip


def _spread(b: dict) -> str:
    """' (median of 11 probes through the run, 29.10 GB/s to 50.70 GB/s)', when there were
    several."""
    samples = b.get("memory_read_samples") or []
    if len(samples) < 2:
        return ""
    low, high = (format_size(v) for v in (min(samples), max(samples)))
    return f" (median of {len(samples)} probes through the run, {low}/s to {high}/s)"


def print_table(out: dict) -> None:
    cfg, b = out["config"], out["bound"]
    table = Table(title=f"subspec bench: {cfg['model']}, budget {cfg['memory_budget']}")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for name, r in out["results"].items():
        table.add_row(*_row(name, r))
    if b:
        table.add_row("disk bound", f"{b['tokens_per_s']:.2f}", *[""] * (len(COLUMNS) - 2))
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDE)  # piped or redirected: do not squeeze the columns
    console.print(table)
    if b:
        share = out["results"]["vanilla"]["tokens_per_s"] / b["tokens_per_s"]
        print(f"slow tier {format_size(b['slow_tier_bytes_per_s'])}/s as read in this run "
              f"({b['store_mode']}; a cold probe: {format_size(b['probe_bytes_per_s'])}/s), "
              f"{format_size(b['streamed_bytes_per_token'])} streamed per pass; vanilla at "
              f"{share:.0%} of the bound; memory read "
              f"{format_size(b['memory_read_bytes_per_s'])}/s{_spread(b)}")  # fmt: skip
    for name, r in out["results"].items():
        if "draft_read_bytes_per_s" in r:
            print(f"{name}: a draft step reads {format_size(r['draft_bytes_per_step'])} in "
                  f"{r['draft_step_s'] * 1e3:.0f} ms = {format_size(r['draft_read_bytes_per_s'])}"
                  f"/s ({r['draft_step_share_of_memory_bw']:.0%} of memory read{_split(r)}); "
                  f"{r['share_of_limit']:.0%} of its overlap limit, "
                  f"{r['share_of_cpu_limit']:.0%} of its CPU limit ("
                  f"{r['cpu_limit_tokens_per_s']:.2f} tok/s: a round drafts "
                  f"{r['draft_s_per_round']:.2f} s and computes its pass "
                  f"{r['pass_compute_s_per_round']:.2f} s, streaming "
                  f"{r['stream_s_per_round']:.2f} s)")  # fmt: skip

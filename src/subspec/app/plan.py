"""`subspec plan`: each method's placement under a budget, from config.json and safetensors
headers only (no weight is read), with each method's minimum budget and what dominates it."""

from __future__ import annotations

import json
from dataclasses import replace

from subspec.app.options import runtime_config
from subspec.config import METHODS, format_size
from subspec.errors import SubspecError
from subspec.hub.models import resolve_model
from subspec.model.checkpoint import Checkpoint
from subspec.model.config import ModelConfig
from subspec.offload.planner import biggest, minimum_parts, plan
from subspec.runtime.sizing import check_kv_fits, method_sizes, process_bytes, resolve_context


def plan_report(args) -> dict:
    """The plan of every method asked for (all of them when --method is not given)."""
    cfg = runtime_config(args, ("vanilla",))
    model_dir = resolve_model(cfg.model)
    model_cfg = ModelConfig.from_dir(model_dir)
    cfg = resolve_context(cfg, model_cfg)
    methods = [args.method] if args.method else [
        m for m in METHODS if m != "classic" or cfg.draft_model
    ]  # fmt: skip
    report = {"model": cfg.model, "device": cfg.device, "dtype": cfg.dtype,
              "context": cfg.context, "memory_budget_bytes": cfg.memory_budget,
              "methods": {}}  # fmt: skip
    with Checkpoint(model_dir) as ckpt:
        for method in methods:
            sizes = method_sizes(cfg, ckpt, model_cfg, method, process_bytes(cfg))
            check_kv_fits(replace(cfg, methods=(method,)), sizes)
            minimum = minimum_parts(sizes, cfg.n_buffers)
            entry = {"minimum_budget_bytes": sum(minimum.values()),
                     "minimum_dominated_by": biggest(minimum)}  # fmt: skip
            try:
                placement = plan(sizes, cfg.memory_budget, cfg.n_buffers)
                entry.update(fits=True, placement=placement.to_dict(), summary=placement.summary())
            except SubspecError as e:
                entry.update(fits=False, error=str(e))
            report["methods"][method] = entry
    return report


def run_plan(args) -> None:
    """Print the plan (text or --json); refuse (exit 2) when no method fits the budget."""
    report = plan_report(args)
    entries = report["methods"]
    if not any(e["fits"] for e in entries.values()):
        first = next(iter(entries.values()))["error"]
        mins = {m: format_size(e["minimum_budget_bytes"]) for m, e in entries.items()}
        each = ", ".join(f"{m} {size}" for m, size in mins.items())
        raise SubspecError(f"{first}; the smallest budget of each method: {each}")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    budget = report["memory_budget_bytes"]
    shown = "no limit" if budget is None else format_size(budget)
    print(f"{report['model']} on {report['device']} ({report['dtype']}), budget {shown}, "
          f"context {report['context']} tokens")  # fmt: skip
    for method, e in entries.items():
        print(f"\n{method}: " + ("fits" if e["fits"] else "does not fit"))
        print(e["summary"] if e["fits"] else f"  {e['error']}")
        print(f"  minimum budget {format_size(e['minimum_budget_bytes'])}, dominated by "
              f"{e['minimum_dominated_by']}")  # fmt: skip

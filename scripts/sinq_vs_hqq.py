"""SINQ against HQQ as SubSpec's substitutes, before building SINQ into the kernels.

    python scripts/sinq_vs_hqq.py error [--layers 0,9,18,27]
    python scripts/sinq_vs_hqq.py tau [--samples 5] [--max-new-tokens 96] [--depth 16]

`error`: each linear's relative reconstruction error ||W - W_hat|| / ||W|| on real layers of
the 1.5B, 4 bits, group 64, for HQQ (kernels/hqq.py) and SINQ (arXiv 2509.22944: per tile of
64 input columns, rows and columns divided by their standard deviations in turn, keeping the
most balanced, then min-max rounding per row with an integer zero point, `sinq`, or HQQ's
solver on the normalized tile, `sinq-hqq`; W ~ s_row * Q * s_col).
`tau`: SubSpec's acceptance with each substitute, all held as their dequantized bf16 weights
(so that all run through the same dense draft layers: tau depends only on the values),
greedy, a fixed tree shape, the same prompts; every streamed layer gets one.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

MODEL = "qwen2.5-coder-1.5b-instruct"


def hqq_dequantized(w: torch.Tensor) -> torch.Tensor:
    from subspec.quant.hqq import quantize_linear

    return quantize_linear(w, None, bits=4, group_size=64).dequantize(torch.float32)


def _balanced(tile: torch.Tensor, iters: int = 16):
    """tile [rows, g] fp32 -> (normalized tile, row scale [rows, 1], column scale [1, g]): the
    iterate whose largest/smallest row or column std is smallest."""
    t = tile.clone()
    row = torch.ones(tile.shape[0], 1)
    col = torch.ones(1, tile.shape[1])
    best = (float("inf"), t, row, col)
    for _ in range(iters):
        stds = torch.cat([t.std(0), t.std(1)]).clamp_min(1e-8)
        imbalance = (stds.max() / stds.min()).item()
        if imbalance < best[0]:
            best = (imbalance, t.clone(), row.clone(), col.clone())
        c = t.std(0, keepdim=True).clamp_min(1e-8)
        t, col = t / c, col * c
        r = t.std(1, keepdim=True).clamp_min(1e-8)
        t, row = t / r, row * r
    return best[1:]


def sinq_dequantized(w: torch.Tensor, bits: int = 4, group: int = 64, solver: str = "rtn"):
    """SINQ's dual scales, each normalized tile rounded by min-max with an integer zero point
    (`rtn`, SINQ's default) or by HQQ's solver (`hqq`, kernels/hqq.py)."""
    from subspec.kernels import hqq

    w = w.float()
    out = torch.empty_like(w)
    top = 2**bits - 1
    for j in range(0, w.shape[1], group):
        t, row, col = _balanced(w[:, j : j + group])
        if solver == "hqq":
            q, scale, zero = hqq.quantize(t.contiguous(), bits, group, torch.float32)
            tile = (q.float() - 8) * scale + zero
        else:
            lo, hi = t.amin(1, keepdim=True), t.amax(1, keepdim=True)
            scale = ((hi - lo) / top).clamp_min(1e-8)
            zero = torch.round(-lo / scale)
            tile = (torch.clamp(torch.round(t / scale + zero), 0, top) - zero) * scale
        out[:, j : j + group] = tile * row * col
    return out


def sinq_hqq_dequantized(w: torch.Tensor) -> torch.Tensor:
    return sinq_dequantized(w, solver="hqq")


QUANTIZERS = {"hqq": hqq_dequantized, "sinq": sinq_dequantized, "sinq-hqq": sinq_hqq_dequantized}


def error(layers: list[int]) -> None:
    from subspec.hub.models import resolve_model
    from subspec.model.checkpoint import Checkpoint, layer_tensors
    from subspec.model.config import ModelConfig

    model_dir = resolve_model(MODEL)
    cfg = ModelConfig.from_dir(model_dir)
    rows = []
    with Checkpoint(model_dir) as ckpt:
        for i in layers:
            t = layer_tensors(ckpt, cfg, i, torch.bfloat16)
            for name in ("qkv", "o", "gate_up", "down"):
                w = t[f"{name}.weight"]
                ref = w.float().norm()
                row = {"layer": i, "linear": name}
                for method, quantize in QUANTIZERS.items():
                    row[method] = round(((quantize(w) - w.float()).norm() / ref).item(), 5)
                rows.append(row)
                print(json.dumps(row), flush=True)
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 5) for k in QUANTIZERS}
    print(json.dumps({"mean_relative_error": mean}))


def tau(samples: int, max_new_tokens: int, depth: int) -> None:
    """Builds the runtime with full-precision substitutes (--bits 16), then replaces each
    substitute's linears by dense ones over the dequantized HQQ or SINQ weights."""
    from subspec.config import RuntimeConfig, SamplingConfig, SpecConfig
    from subspec.hub.datasets import load_prompts
    from subspec.hub.models import resolve_model
    from subspec.model.checkpoint import Checkpoint, layer_tensors
    from subspec.model.layers import dense
    from subspec.runtime.build import build_runtime
    from subspec.runtime.generate import stream_generate
    from subspec.runtime.runtime import Request

    os.environ["SUBSPEC_BUDGET_WEIGHTS_ONLY"] = "1"  # the weights alone place the layers
    spec = SpecConfig(bits=16, depth=depth, residual_stream=False, overlap=False)
    cfg = RuntimeConfig(model=MODEL, memory_budget=3_100_000_000, methods=("subspec",),
                        spec=spec)  # fmt: skip
    runtime = build_runtime(cfg, progress=False)
    layers = runtime.drafters["subspec"].layers.resident
    prompts = [runtime.encode_prompt(p, chat=True) for p in load_prompts("mt-bench", samples)]
    model_dir = resolve_model(MODEL)
    for method, quantize in QUANTIZERS.items():
        with Checkpoint(model_dir) as ckpt:
            for i in runtime.placement.streamed_layers:
                t = layer_tensors(ckpt, runtime.model_cfg, i, torch.bfloat16)
                for name in ("qkv", "o", "gate_up", "down"):
                    w = quantize(t[f"{name}.weight"]).to(torch.bfloat16)
                    setattr(layers[i], name, dense(w, t.get(f"{name}.bias")))
        emitted = forwards = 0
        for ids in prompts:
            request = Request(ids, "subspec", max_new_tokens, SamplingConfig())
            stats = [ev.stats for ev in stream_generate(runtime, request) if ev.stats][-1]
            emitted += stats.new_tokens - 1
            forwards += stats.target_forwards
        print(json.dumps({"substitutes": method, "depth": depth, "prompts": samples,
                          "tau": round(emitted / forwards, 3)}), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("error", "tau"))
    parser.add_argument("--layers", default="0,9,18,27")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--depth", type=int, default=16)
    args = parser.parse_args()
    if args.what == "error":
        error([int(x) for x in args.layers.split(",")])
    else:
        tau(args.samples, args.max_new_tokens, args.depth)


if __name__ == "__main__":
    main()

"""ms per call of torch's F.linear (bf16) and subspec.exact.exact_linear on the linear shapes of
Qwen2.5-1.5B, and of model.attention vs exact_attention on its attention shapes.

    PYTHONPATH=src python scripts/exact_speed.py [--threads N] [--quick]

Random bf16 weights; the median of several calls after a warm-up. Timings are side by side in
one run, so only the ratios mean much on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from subspec.kernels.exact import exact_attention, exact_linear, has_dpbf16
from subspec.model import attention

LINEARS = {  # name: (out, in, bias)
    "qkv": (2048, 1536, True),
    "o": (1536, 1536, False),
    "gate_up": (17920, 1536, False),
    "down": (1536, 8960, False),
    "lm_head": (151936, 1536, False),
}
ROWS = (1, 2, 33, 289, 512)
ATTENTION = [(12, 2, 128, t, s) for t in (1, 2, 33) for s in (500, 1000)] + [
    (9, 3, 64, t, 1000) for t in (1, 33)
]  # (Hq, Hkv, D, T, S)


def _ms(fn, *args, budget_s: float = 0.5) -> float:
    """Median ms of fn(*args) over up to 20 calls or about budget_s s, after one warm-up."""
    fn(*args)
    times = []
    start = time.perf_counter()
    while len(times) < 20 and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def linear_table(rows) -> None:
    print(f"{'shape':>22} {'T':>4} {'F.linear':>9} {'exact':>9} {'ratio':>6}")
    for name, (n, k, has_bias) in LINEARS.items():
        w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)  # [out, in]
        b = torch.randn(n).to(torch.bfloat16) if has_bias else None
        for t in rows:
            x = torch.randn(t, k).to(torch.bfloat16)  # [T, in]
            ref = _ms(F.linear, x, w, b)
            ours = _ms(exact_linear, x, w, b)
            label = f"{name} ({n},{k})"
            print(f"{label:>22} {t:>4} {ref:>9.3f} {ours:>9.3f} {ours / ref:>6.2f}", flush=True)


def attention_table() -> None:
    print(f"\n{'Hq,Hkv,D':>10} {'T':>3} {'S':>5} {'attention':>10} {'exact':>9} {'ratio':>6}")
    for hq, hkv, d, t, s in ATTENTION:
        q = torch.randn(hq, t, d).to(torch.bfloat16)  # [Hq, T, D]
        k = torch.randn(hkv, s, d).to(torch.bfloat16)  # [Hkv, S, D]
        v = torch.randn(hkv, s, d).to(torch.bfloat16)
        mask = torch.ones(t, s, dtype=torch.bool)
        mask[:, s - t :] = torch.rand(t, t) < 0.3  # a tree's sparse tail
        ref = _ms(attention, q, k, v, mask)
        ours = _ms(exact_attention, q, k, v, mask)
        label = f"{hq},{hkv},{d}"
        print(f"{label:>10} {t:>3} {s:>5} {ref:>10.3f} {ours:>9.3f} {ours / ref:>6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="T = 1 and 33 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, vdpbf16ps path: {has_dpbf16()}")
    linear_table((1, 33) if args.quick else ROWS)
    attention_table()


if __name__ == "__main__":
    main()

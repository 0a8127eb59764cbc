"""Project SubSpec's speed on a large model from a run on its random-weight dummy and the
acceptance of a real model.

    python scripts/scale_projection.py REAL.json DUMMY.json [--method subspec]

REAL.json: `subspec bench --json` of a real model (its rounds' depths and accepted lengths).
DUMMY.json: `subspec bench --json` of a dummy at a fixed depth (`--depth N`): vanilla's
tok/s and SubSpec's measured round time at that depth. A dummy's own acceptance means nothing
(random weights), so the projection borrows the real model's: tau(N) = 1 + sum over k <= N of
P(accepted >= k), estimated from the real rounds drafted at least k deep (Kaplan-Meier: a
round drafted d deep says nothing about levels past d). Projected tok/s = tau(N) / the dummy's
round time at depth N. A projection, not a measurement: a real large model may accept more
or less than the small one.
"""

from __future__ import annotations

import argparse
import json


def survival(depths: list[int], accepted: list[int], most: int) -> list[float]:
    """S[k-1] = P(accepted >= k) for k = 1..most, from rounds (depth d, accepted a)."""
    out, s = [], 1.0
    for k in range(1, most + 1):
        at_risk = sum(1 for d, a in zip(depths, accepted, strict=True) if d >= k and a >= k - 1)
        passed = sum(1 for d, a in zip(depths, accepted, strict=True) if d >= k and a >= k)
        s *= passed / at_risk if at_risk else 0.0
        out.append(s)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real", help="bench JSON of the real model")
    parser.add_argument("dummy", help="bench JSON of the dummy, run at a fixed --depth")
    parser.add_argument("--real-method", default="subspec", help="its row in REAL.json")
    parser.add_argument("--method", default="subspec", help="its row in DUMMY.json")
    args = parser.parse_args()
    real = json.load(open(args.real))["results"][args.real_method]
    dummy = json.load(open(args.dummy))["results"]
    spec, vanilla = dummy[args.method], dummy["vanilla"]
    depth = round(spec["depth"])
    rounds = spec["round_parts"]
    accept = survival(real["depths"], real["accept_lengths"], depth)
    tau = 1 + sum(accept)
    round_s = spec["round_s"]
    projected = tau / round_s
    print(json.dumps({
        "depth": depth,
        "rounds_measured": len(rounds),
        "tau_borrowed": round(tau, 3),
        "p_accepted_at_least": [round(p, 3) for p in accept],
        "real_rounds": len(real["depths"]),
        "round_s": round(round_s, 4),
        "stream_s_per_round": round(spec["stream_s_per_round"], 4),
        "draft_s_per_round": round(spec["draft_s_per_round"], 4),
        "pass_compute_s_per_round": round(spec["pass_compute_s_per_round"], 4),
        "vanilla_tokens_per_s": round(vanilla["tokens_per_s"], 4),
        "projected_tokens_per_s": round(projected, 3),
        "projected_speedup": round(projected / vanilla["tokens_per_s"], 2),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

"""Load test: N concurrent streams with the openai client against a running `subspec serve`.

    python scripts/load_test.py http://127.0.0.1:8000/v1 64 32

Starts the streams a few milliseconds apart (a definite arrival order), then prints each
request's queue wait (time to its first token) and total time, and whether every request was
served, in arrival order (each one's first token after the previous one's last), unmixed (the
stream for prompt i is the same text as a plain request for prompt i gets), with none lost.
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time

import openai

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def prompt(i: int) -> str:
    return f"Request {i}: repeat the word {WORDS[i % len(WORDS)]} a few times."


def one(client, model: str, i: int, max_tokens: int, t0: float, out: dict) -> None:
    """Stream request i; record its first/last token times and its text."""
    sent = time.monotonic()
    first = last = None
    pieces = []
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt(i)}],
            max_tokens=max_tokens, temperature=0, stream=True,
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                pieces.append(chunk.choices[0].delta.content)
            last = time.monotonic()
        out[i] = {"sent": sent - t0, "first": (first or last) - t0, "last": last - t0,
                  "text": "".join(pieces)}  # fmt: skip
    except openai.OpenAIError as e:
        out[i] = {"error": f"{type(e).__name__}: {e}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("base_url")
    p.add_argument("n", type=int)
    p.add_argument("max_tokens", type=int)
    p.add_argument("--stagger", type=float, default=0.02, help="seconds between stream starts")
    args = p.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="none", max_retries=0, timeout=3600)
    model = client.models.list().data[0].id
    out: dict[int, dict] = {}
    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(client, model, i, args.max_tokens, t0, out))
               for i in range(args.n)]  # fmt: skip
    for t in threads:
        t.start()
        time.sleep(args.stagger)
    for t in threads:
        t.join()
    return report(client, model, out, args)


def report(client, model: str, out: dict, args) -> int:
    """Print per-request figures and the verdicts; exit status 0 only when all hold."""
    print(f"{'req':>4} {'sent_s':>8} {'wait_s':>8} {'total_s':>8}  text")
    for i in range(args.n):
        r = out.get(i, {"error": "lost"})
        if "error" in r:
            print(f"{i:>4} ERROR {r['error']}")
            continue
        print(f"{i:>4} {r['sent']:8.2f} {r['first'] - r['sent']:8.2f} {r['last'] - r['sent']:8.2f}"
              f"  {r['text'][:40]!r}")  # fmt: skip
    ok = [i for i in range(args.n) if "error" not in out.get(i, {"error": 1})]
    in_order = all(out[a]["last"] <= out[b]["first"] + 1e-3 for a, b in itertools.pairwise(ok))
    check = range(0, args.n, max(args.n // 4, 1))  # a few requests, asked again, plainly
    unmixed = all(
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt(i)}],
            max_tokens=args.max_tokens, temperature=0,
        ).choices[0].message.content == out[i]["text"]
        for i in check if i in ok
    )  # fmt: skip
    print(f"served {len(ok)}/{args.n}, lost {args.n - len(ok)}, in arrival order: {in_order}, "
          f"unmixed (checked {len(check)} against plain requests): {unmixed}")  # fmt: skip
    return 0 if len(ok) == args.n and in_order and unmixed else 1


if __name__ == "__main__":
    raise SystemExit(main())

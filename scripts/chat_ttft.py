"""Time to first token of a chat's second turn, with and without prefix reuse.

The first turn is a long user message (HumanEval prompts laid end to end, to --first-tokens);
the second is a short follow-up. The same loaded model answers the second turn twice: on the
cache the first turn left (reuse), then after `forget()` (the whole conversation prefilled).
Both replies must be the same text; the script says so and exits 1 if not.

    .venv/bin/python scripts/chat_ttft.py --memory-budget 1.78GB
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import subspec
from subspec.hub.datasets import load_prompts


def long_message(tokenizer, tokens: int) -> str:
    """Code to review: HumanEval prompts until the message reaches `tokens` tokens."""
    parts, n = ["Review the following functions and list their bugs.\n"], 0
    for prompt in load_prompts("humaneval"):
        parts.append(prompt)
        n += len(tokenizer(prompt)["input_ids"])
        if n >= tokens:
            break
    return "\n".join(parts)


def timed_turn(llm, messages, max_tokens: int) -> dict:
    """The reply to `messages`, its time to first token and the stats."""
    t0 = time.perf_counter()
    ttft, pieces, last = None, [], None
    for chunk in llm.stream_chat(messages, max_tokens=max_tokens):
        if ttft is None and chunk.token_ids:
            ttft = time.perf_counter() - t0
        pieces.append(chunk.text)
        last = chunk
    s = last.stats
    return {"text": "".join(pieces), "ttft_s": round(ttft, 3), "prompt_tokens": s.prompt_tokens,
            "cached_prompt_tokens": s.cached_prompt_tokens, "prefill_s": s.prefill_s,
            "decode_tokens_per_s": round(s.decode_tokens_per_s, 2)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--memory-budget", default="1.78GB")
    p.add_argument("--first-tokens", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--method", default=None)
    args = p.parse_args()
    with subspec.load(args.model, args.memory_budget, method=args.method) as llm:
        messages = [{"role": "user", "content": long_message(llm.runtime.tokenizer,
                                                             args.first_tokens)}]  # fmt: skip
        first = timed_turn(llm, messages, args.max_tokens)
        follow_up = "Now write tests for the first function."
        messages += [{"role": "assistant", "content": first["text"]},
                     {"role": "user", "content": follow_up}]  # fmt: skip
        reused = timed_turn(llm, messages, args.max_tokens)
        llm.forget()
        fresh = timed_turn(llm, messages, args.max_tokens)
        method = llm.method
    same = reused["text"] == fresh["text"]
    result = {"model": args.model, "memory_budget": args.memory_budget, "method": method,
              "first_turn": first, "second_turn_reused": reused, "second_turn_fresh": fresh,
              "ttft_ratio": round(fresh["ttft_s"] / reused["ttft_s"], 2),
              "same_text": same}  # fmt: skip
    for turn in ("first_turn", "second_turn_reused", "second_turn_fresh"):
        result[turn].pop("text")
    print(json.dumps(result, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""How often each tree policy holds the target's sample, measured on the same rounds.

At every round of a sampled (or greedy) generation, each policy drafts its tree from the same
root and the target verifies it. Two numbers per policy: `accepted`, what the walk accepts
with the request's own next draws (a copy of its generator), and `E`, the expected accepted
length over fresh draws (the sum over the tree's nodes of the target's probability of
sampling the path to it; greedy: the accepted length). E is the right measure of a tree that
ignores the draws; a coupled tree (cp=1: proposals.Coupled, which reads them) is measured by
`accepted`. The generation advances on the last policy's walk. The default budget, 4 GB,
streams part of the 1.5B, so the draft is the one at 1.78 GB (4-bit substitutes of every
layer and a 4-bit head) while the target's passes stream less (acceptance is what it
measures, not time). A policy is
w=WIDTH,s=LEVELS[,td=DRAFT_TEMPERATURE][,cp=1].

    python scripts/tree_quality.py --temperature 0.7 w=3,s=10 w=2,s=16,cp=1
"""

from __future__ import annotations

import argparse
import time

import torch

from subspec.config import RuntimeConfig, SamplingConfig, SpecConfig, parse_size
from subspec.hub.datasets import load_prompts
from subspec.runtime.build import build_runtime
from subspec.speculative.decoding import prefill
from subspec.speculative.proposals import Coupled, Dice, Ranked
from subspec.speculative.sampling import choose, target_probs
from subspec.speculative.tree import TreeBuilder
from subspec.speculative.verify import walk


def expected_accepted(tree, logits, sampling: SamplingConfig) -> float:
    """The sum over the tree's nodes of the target's probability of sampling the path to it
    (greedy: the accepted length, which the greedy walk draws nothing for)."""
    if sampling.greedy:
        return walk(tree, logits, sampling, None).accepted
    probs = target_probs(logits, sampling)  # [n, V]
    p = probs[tree.parents.clamp(min=0), tree.tokens]  # [n] chance of each edge
    p[0] = 1.0
    path = (tree.ancestors.float() @ p.clamp(min=1e-30).log()).exp()  # [n]
    return float(path[1:].sum())


def _copy(gen: torch.Generator) -> torch.Generator:
    g = torch.Generator()
    g.set_state(gen.get_state())
    return g


def parse(text: str) -> tuple[str, dict]:
    kv = dict(item.split("=") for item in text.split(",") if item)
    return text, {k: float(v) if "." in v else int(v) for k, v in kv.items()}


def proposal(opts: dict, sampling: SamplingConfig, dice: Dice | None):
    temperature = opts.get("td", 0.2)
    if opts.get("cp") and dice is not None:
        return Coupled(dice, sampling, temperature, dice.first)
    return Ranked(temperature)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("policies", nargs="+")
    p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--memory-budget", default="4GB")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    policies = [parse(t) for t in a.policies]
    spec = SpecConfig(depth=64, width=8, overlap=False)
    cfg = RuntimeConfig(
        model=a.model, memory_budget=parse_size(a.memory_budget), methods=("subspec",), spec=spec
    )
    rt = build_runtime(cfg)
    drafter, target = rt.drafters["subspec"], rt.target
    cache, device = target.cache, target.device
    totals = {label: [0.0, 0, 0, 0] for label, _ in policies}  # E, nodes, steps, accepted
    rounds = 0
    t_start = time.time()
    for i, prompt in enumerate(load_prompts("mt-bench", a.samples)):
        ids = rt.encode_prompt(prompt, chat=True)
        sampling = SamplingConfig(a.temperature, a.top_p, 0, a.seed + i)
        gen = torch.Generator().manual_seed(sampling.seed)
        cache.trim(0)
        logits0 = prefill(target, ids, 512)
        pending = choose(logits0, sampling, gen)
        dice = (
            None
            if sampling.greedy
            else Dice(gen, logits0.shape[-1], device, SpecConfig().draws_ahead)
        )
        emitted = 1
        while emitted < a.max_new_tokens:
            start = cache.length
            for label, opts in policies:
                propose = proposal(opts, sampling, dice)
                b = TreeBuilder(pending, opts["s"], opts["w"], propose, drafter.step, device, start)
                while not b.done:
                    b.step()
                tree = b.tree()
                hidden = target.forward(
                    tree.tokens,
                    tree.positions(start),
                    tree.slots(start),
                    tree.mask(start),
                    start + tree.size,
                )
                logits = target.logits(hidden)
                t = totals[label]
                t[0] += expected_accepted(tree, logits, sampling)
                t[3] += walk(tree, logits, sampling, _copy(gen)).accepted
                t[1] += tree.size
                t[2] += tree.depth
            verdict = walk(tree, logits, sampling, gen)
            if dice is not None:
                dice.advance(len(verdict.tokens))
            cache.advance(1)
            cache.accept(verdict.nodes + start)
            pending = verdict.bonus
            emitted += len(verdict.tokens)
            rounds += 1
        print(f"prompt {i}: {rounds} rounds so far, {time.time() - t_start:.0f} s", flush=True)
    print(f"T {a.temperature} top-p {a.top_p}: {rounds} rounds")
    for label, (e, n, d, acc) in totals.items():
        print(
            f"{label:40s} E {e / rounds:6.2f}  accepted {acc / rounds:6.2f}  "
            f"nodes {n / rounds:5.1f}  depth {d / rounds:5.1f}"
        )
    rt.close()


if __name__ == "__main__":
    main()

"""How fast the streamed layers read alone, and with draft steps run in the prefetcher's waits
(as drafting ahead runs them) on all threads and on one.

    .venv/bin/python scripts/read_interference.py [--model M] [--memory-budget B] [--cycles N]

Each row streams every offloaded layer `--cycles` times through the subspec runtime's own
prefetcher, acquiring and releasing in pass order; the draft rows run a 2-row draft step, part
by part, whenever the next layer has not arrived yet. The rows alternate (alone, then each kind
of drafting, twice), since the disk's speed drifts on shared machines.
"""

from __future__ import annotations

import argparse
import time

import torch

from subspec.app.cli import build_parser
from subspec.app.options import runtime_config
from subspec.runtime.build import build_runtime

KV_LEN = 200  # slots the draft step attends to (the cache's contents do not matter here)


def _draft_work(drafter, threads: int):
    """A prefetcher idle callback running 2-row draft steps, a part per call, on `threads`."""
    tokens, positions = torch.tensor([100, 200]), torch.tensor([KV_LEN, KV_LEN])
    slots, mask = torch.tensor([KV_LEN, KV_LEN + 1]), torch.ones(2, KV_LEN + 2, dtype=torch.bool)

    def steps():  # one draft step after another, a part per next()
        while True:
            yield from drafter.step_parts(tokens, positions, slots, mask, KV_LEN + 2)

    parts = steps()

    def work(expected_wait_s: float) -> bool:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            next(parts)
        finally:
            torch.set_num_threads(previous)
        return True

    return work


def _read_rate(prefetcher, idle, cycles: int) -> float:
    """Bytes per second over `cycles` passes of acquire/release, idle() filling the waits."""
    prefetcher.reset_stats()
    start = time.perf_counter()
    for _ in range(cycles):
        for unit in prefetcher.units:
            prefetcher.acquire(unit, idle)
            prefetcher.release(unit)
    return prefetcher.stats.bytes_read / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--memory-budget", default="1.78GB")
    p.add_argument("--cycles", type=int, default=4)
    a = p.parse_args()
    args = build_parser().parse_args(
        ["bench", "--model", a.model, "--memory-budget", a.memory_budget, "--methods", "subspec"]
    )
    with build_runtime(runtime_config(args, ("subspec",))) as runtime:
        streamer = runtime.target.layers.streamer
        if streamer is None:
            raise SystemExit("nothing streams at this budget")
        drafter, all_threads = runtime.drafters["subspec"], torch.get_num_threads()
        rows = [("alone", None), (f"drafting on {all_threads} threads",
                                  _draft_work(drafter, all_threads)),
                ("drafting on 1 thread", _draft_work(drafter, 1))]  # fmt: skip
        for label, idle in rows + rows:
            rate = _read_rate(streamer.prefetcher, idle, a.cycles)
            print(f"{label:>24}: {rate / 1e9:.2f} GB/s", flush=True)


if __name__ == "__main__":
    main()

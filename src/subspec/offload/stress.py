"""A GPU stress test of the prefetcher's CUDA ordering, and its control.

Large units (default 128 MiB, so a copy takes milliseconds), a consumer that checks its
buffer at once (did the copy land?) and again after a long GPU sleep (was the buffer refilled
under it?), and no host synchronisation between a release and the next fill. With the
ordering (the events' wait_event calls) the consumer never sees another unit's bytes; the
control run removes the ordering and must see them. CUDA only.
"""

from __future__ import annotations

import functools

import torch

from subspec.offload.prefetch import Prefetcher, _CudaSync
from subspec.offload.stores import PinnedHostStore

SLEEP_CYCLES = 20_000_000  # ~10 ms of GPU clock: far longer than one unit's copy


class _NoOrdering(_CudaSync):
    """The side stream and events without the waits: compute never waits for a copy, and a
    copy never waits for compute (its free event is never recorded, so waiting is a no-op)."""

    def before_use(self, slot: int) -> None:
        pass

    def after_use(self, slot: int) -> None:
        pass


class _UnorderedPrefetcher(Prefetcher):
    sync_class = _NoOrdering


def _unit(value: int, nbytes: int) -> dict[str, torch.Tensor]:
    return {"data": torch.full((nbytes,), value, dtype=torch.uint8)}


def prefetch_stress(
    device: str | torch.device = "cuda",
    unit_bytes: int = 128 << 20,
    n_units: int = 4,
    passes: int = 3,
    ordered: bool = True,
) -> int:
    """Consumer checks that saw wrong bytes (0 is correct). ``ordered=False``: the control."""
    device = torch.device(device)
    values = {u: u + 1 for u in range(n_units)}  # a unit's bytes all equal its value
    store = PinnedHostStore({u: functools.partial(_unit, v, unit_bytes) for u, v in values.items()})
    cls = Prefetcher if ordered else _UnorderedPrefetcher
    bad = torch.zeros((), dtype=torch.int64, device=device)  # counted on the GPU: no sync
    try:
        with cls(store, list(values), n_buffers=2, device=device) as pf:
            for _ in range(passes):
                for unit, value in values.items():
                    buf = pf.acquire(unit)[:unit_bytes]
                    bad += (buf != value).any()  # the copy has landed
                    torch.cuda._sleep(SLEEP_CYCLES)  # a slow reader
                    bad += (buf != value).any()  # and was not overwritten meanwhile
                    pf.release(unit)
        torch.cuda.synchronize(device)
        return int(bad)
    finally:
        store.close()

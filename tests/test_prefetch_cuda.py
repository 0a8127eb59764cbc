"""The prefetcher's CUDA ordering under stress (offload/stress.py). Skipped without CUDA: the
bugs it catches need asynchronous copies on a real device; test_offload.py checks the event
protocol with fakes on the CPU."""

from __future__ import annotations

import pytest
import torch

from subspec.offload.stress import prefetch_stress

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (asynchronous copies)"
)


def test_ordered_prefetcher_never_serves_wrong_bytes():
    assert prefetch_stress(ordered=True) == 0


def test_control_without_ordering_must_fail():
    assert prefetch_stress(ordered=False) > 0  # else the stress test catches nothing

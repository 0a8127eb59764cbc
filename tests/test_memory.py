"""The budget is what the process takes: the plan counts the process itself, peak RSS stays
within the budget, and a model runs under a hard memory limit (scripts/memlimit)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MEMLIMIT = Path(__file__).parents[1] / "scripts" / "memlimit"
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _cgroups_writable() -> bool:
    root = CGROUP_V1 if (CGROUP_V1 / "memory.limit_in_bytes").exists() else Path("/sys/fs/cgroup")
    return os.access(root, os.W_OK) and (
        (root / "memory.limit_in_bytes").exists() or (root / "cgroup.controllers").exists()
    )


needs_cgroups = pytest.mark.skipif(
    not _cgroups_writable(), reason="no writable memory cgroup here (needs root and cgroupfs)"
)


def _generate(model, budget: str, *extra, env=None, limit: str | None = None):
    cmd = [sys.executable, "-m", "subspec.app.cli", "generate", "--model", str(model),
           "--prompt", "The quick brown fox", "--max-new-tokens", "6", "--memory-budget",
           budget, "--json", *extra]  # fmt: skip
    if limit is not None:
        cmd = [sys.executable, str(MEMLIMIT), limit, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _counting_process() -> dict:
    env = dict(os.environ)
    env.pop("SUBSPEC_BUDGET_WEIGHTS_ONLY")
    return env


def test_plan_counts_the_process(tiny_model_dir):
    """A budget that holds the tiny model's weights but not the process is refused, naming
    the process among the biggest parts."""
    done = _generate(tiny_model_dir, "8MB", env=_counting_process())
    assert done.returncode == 2
    assert "process" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_peak_rss_within_budget_on_a_real_model(smollm2_dir):
    """SmolLM2 (270 MB in bf16) at a budget that makes it stream: the process, not just the
    weights, stays within 105% of the budget."""
    budget = 800_000_000
    done = _generate(smollm2_dir, str(budget), env=_counting_process())
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)["stats"]
    assert stats["placement"]["streamed_layers"], "the budget should make layers stream"
    assert stats["placement"]["breakdown"]["process"] >= stats["rss_before_load_bytes"]
    assert stats["peak_rss_bytes"] <= 1.05 * budget
    assert stats["load_peak_rss_bytes"] <= 1.05 * budget


@needs_cgroups
def test_memlimit_reports_an_oom_kill():
    done = subprocess.run(
        [sys.executable, str(MEMLIMIT), "64MB", sys.executable, "-c", "b = bytearray(300 << 20)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 137
    assert "OOM kills 1" in done.stderr


def test_memlimit_refuses_a_bad_size():
    done = subprocess.run([sys.executable, str(MEMLIMIT), "ten", "true"], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 2 and "not a size" in done.stderr


@needs_cgroups
def test_streamed_model_under_a_hard_limit(tiny_model_dir):
    """The tiny model streaming under a cgroup that charges the page cache: the same tokens
    as without the limit, no OOM kill."""
    free = _generate(tiny_model_dir, "800kB", "--dtype", "float32", "--context", "256")
    limited = _generate(
        tiny_model_dir, "800kB", "--dtype", "float32", "--context", "256", limit="1.5GB"
    )
    assert free.returncode == 0 and limited.returncode == 0, limited.stderr
    assert "OOM kills 0" in limited.stderr
    stats = json.loads(limited.stdout)["stats"]
    assert stats["placement"]["streamed_layers"]
    assert json.loads(limited.stdout)["token_ids"] == json.loads(free.stdout)["token_ids"]

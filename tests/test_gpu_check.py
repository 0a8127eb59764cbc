"""scripts/gpu-check runs end to end on the CPU (a tiny random model), reporting the steps
that need CUDA as skipped, and imports no web-server or hqq package on the engine path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_on_cpu_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "SUBSPEC_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu-check"), "--device", "cpu", "--quiet",
           "--out", str(out), "--tokens", "8"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    for key in ("device", "tests_passed", "vanilla_tokens_per_s", "transfer_bound_tokens_per_s",
                "subspec", "steps"):  # fmt: skip
        assert key in report
    assert report["device"] == "cpu" and report["tests_passed"] > 0
    assert report["tests_failed"] == 0
    steps = report["steps"]
    assert steps["prefetch_ordering"]["status"] == steps["bandwidth"]["status"] == "skipped"
    assert steps["lossless"]["subspec"]["identical"] and steps["lossless"]["streamed_layers"]
    for key in ("draft_step_s", "verify_s", "transfer_wait_s", "round_s", "tau", "depth"):
        assert key in report["subspec"]
    assert "int4_layout" in done.stdout


def test_engine_imports_no_server_or_hqq():
    code = (
        "import sys, subspec.runtime.build, subspec.bench.gpu_check\n"
        "bad = {'fastapi', 'uvicorn', 'pydantic', 'starlette', 'hqq'}\n"
        "print(sorted(bad & {m.split('.')[0] for m in sys.modules}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr

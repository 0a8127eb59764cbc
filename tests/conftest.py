"""Shared fixtures: tiny random models built offline, and the real smollm2 pulled once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import write_tiny_llama, write_tiny_qwen2

from subspec.hub import models as hub

# Budgets of a few MB place the tiny models: the process's own ~0.4 GB and its working memory
# are not counted in them (a test that wants them counted removes this); subprocesses inherit it.
os.environ["SUBSPEC_BUDGET_WEIGHTS_ONLY"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Directory of a tiny random Llama model (config, float32 safetensors, tokenizer)."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_model_dir(tmp_path_factory) -> Path:
    """Directory of a tiny random Qwen2 model (qkv bias, untied lm_head)."""
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, pulled into the subspec cache on first use."""
    return hub.resolve_model("smollm2-135m-instruct", progress=False)

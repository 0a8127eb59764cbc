"""Shared fixtures: tiny random models built offline, and the real smollm2 pulled once.

The suite runs in a temporary $SUBSPEC_HOME, removed at the end, so that it leaves the user's
cache as it found it: only converted models and prompt sets are shared with the user's cache
(the default model is pulled there once, as the README's first command does)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import make_layer, write_tiny_llama, write_tiny_qwen2

from subspec.files import cache_root
from subspec.hub import models as hub
from subspec.offload.layer_file import layer_path, write_layer_file

SHARED = ("models", "datasets")  # what the suite reads from the user's cache
_USER_CACHE = cache_root()
_HOME = Path(tempfile.mkdtemp(prefix="subspec-tests-"))
for _name in SHARED:
    (_USER_CACHE / _name).mkdir(parents=True, exist_ok=True)
    (_HOME / _name).symlink_to(_USER_CACHE / _name, target_is_directory=True)
os.environ["SUBSPEC_HOME"] = str(_HOME)  # subprocesses inherit it


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)  # the links go, not what they point to


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


@pytest.fixture
def layer_dir(tmp_path):
    """Six layer files; returns (directory, manifests, tensors by unit)."""
    tensors = {u: make_layer(u) for u in range(6)}
    manifests = {u: write_layer_file(layer_path(tmp_path, u), t) for u, t in tensors.items()}
    return tmp_path, manifests, tensors

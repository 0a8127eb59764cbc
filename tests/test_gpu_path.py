"""The CUDA path's device-agnostic pieces, run on the CPU: fused-kernel attention inputs,
the planner's CUDA workspace, the budget without a limit, the slow tier's bandwidth probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from subspec.memory import device_peak_bytes, fast_memory_budget
from subspec.model import forward
from subspec.model.config import ModelConfig
from subspec.offload.planner import ModelSizes, plan
from subspec.sizes import CUDA_CONTEXT_BYTES, workspace_nbytes


def _reference(q, keys, values, mask):
    group = q.shape[0] // keys.shape[0]
    k, v = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = (q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4)])
def test_fused_attention_inputs_match_the_masked_reference(hq, hkv):
    torch.manual_seed(0)
    t, s, d = 80, 100, 16  # more queries than SMALL_QUERY: the fused path on CUDA
    q, k, v = torch.randn(hq, t, d), torch.randn(hkv, s, d), torch.randn(hkv, s, d)
    mask = forward.causal_mask(s - t, t, "cpu")
    mask[5, :3] = False  # a tree-like hole
    expected = _reference(q, k, v, mask)
    additive = forward.additive_mask(mask, q.dtype)
    assert additive.dtype == q.dtype and torch.isinf(additive).sum() == (~mask).sum()
    for m in (mask, additive):
        torch.testing.assert_close(forward.fused_attention(q, k, v, m), expected)
    # on CPU the mask stays bool (the CPU kernels are chosen by measurement)
    assert forward.fused_kernel_mask(mask, torch.float32) is mask


def test_mapped_embedding_on_cpu_reads_rows():
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    emb = forward.Embedding(mapped=(rows, torch.float32), dtype=torch.float32, device="cpu")
    assert emb(torch.tensor([2, 0])).tolist() == [rows[2].tolist(), rows[0].tolist()]


def _cfg() -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_theta=1e4, max_position_embeddings=4096, tie_word_embeddings=False,
        qkv_bias=False, qk_norm=False,
    )  # fmt: skip


def test_workspace_grows_with_rows_and_cuda_counts_more():
    cfg = _cfg()
    cpu = workspace_nbytes(cfg, 289, 4096, torch.bfloat16, "cpu", logit_rows=289)
    # a CPU round: fp32 scores of every head over the cache, fp32 logits and their softmax
    assert cpu >= 289 * (4 * 4096 * 4 + 2 * 1000 * 4)
    assert workspace_nbytes(cfg, 1, 64, torch.bfloat16, "cpu") < cpu
    assert workspace_nbytes(cfg, 289, 4096, torch.bfloat16, "cuda") > cpu + CUDA_CONTEXT_BYTES
    small = workspace_nbytes(cfg, 1, 64, torch.bfloat16, "cuda")
    big = workspace_nbytes(cfg, 289, 4096, torch.bfloat16, "cuda")
    assert CUDA_CONTEXT_BYTES < small < big
    # fp32 scores of every head over the cache, and fp32 logits: at least these
    assert big - CUDA_CONTEXT_BYTES > 2 * 4 * 289 * 4096 * 4 + 2 * 289 * 1000 * 4
    sizes = ModelSizes(4, 100, 0, 50, 50, 1, 10, workspace_bytes=1000)
    assert plan(sizes, None).breakdown["workspace"] == 1000


def test_budget_defaults():
    assert fast_memory_budget(None, torch.device("cpu")) is None
    assert fast_memory_budget(123, torch.device("cpu")) == 123
    assert device_peak_bytes(torch.device("cpu")) is None

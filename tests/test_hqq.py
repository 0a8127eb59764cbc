"""The HQQ quantizer (kernels/hqq.py, csrc/hqq.c) against the hqq package, its oracle, and
against its own torch fallback."""

import pytest
import torch
from helpers import require_kernel

from subspec.errors import SubspecError
from subspec.kernels import hqq as K
from subspec.kernels import native


@pytest.fixture
def kernel():
    """The HQQ kernel: a skip where none can be built here, a failure where it should."""
    return require_kernel(native.hqq(), "hqq", x86_only=False)


needs_native = pytest.mark.usefixtures("kernel")


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """LLM-like bf16 weights: small values, a few outliers, some rows of a far wider range
    (their rounding errors reach the solver's shrink threshold)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[torch.rand(rows, cols, generator=g) < 1e-3] *= 40
    w[::7] *= 120
    return w.to(torch.bfloat16)


def _hqq_oracle(w: torch.Tensor, bits: int, group: int, optimize: bool):
    """hqq's own solution, in subspec's convention (as quant/hqq.py stored it before)."""
    quantizer = pytest.importorskip("hqq.core.quantize", reason="hqq (the test extra) absent")
    _, meta = quantizer.Quantizer.quantize(
        w, nbits=bits, group_size=group, optimize=optimize, axis=1, bitpack=False, device="cpu"
    )
    rows = w.shape[0]
    scale = meta["scale"].float().view(rows, -1)
    off = 128 if bits == 8 else 8
    zero = ((off - meta["zero"].float().view(rows, -1)) * scale).to(torch.bfloat16)
    scale = scale.to(torch.bfloat16)
    q = (w.float().view(rows, -1, group) - zero.float()[..., None]) / scale.float()[..., None]
    q = q.round_().add_(off).clamp_(0, 2**bits - 1).to(torch.uint8).view(w.shape)
    return q, scale, zero


def _error(w, q, scale, zero, bits, group) -> float:
    off = 128 if bits == 8 else 8
    rows = w.shape[0]
    groups = (q.float().view(rows, -1, group) - off) * scale.float()[..., None]
    return (groups + zero.float()[..., None]).view(w.shape).sub(w.float()).abs().mean().item()


@needs_native
@pytest.mark.parametrize("bits,group", [(4, 64), (2, 64), (3, 32), (8, 128), (4, 24)])
def test_native_error_within_1_percent_of_hqq(bits, group):
    w = _weight(96, 768)
    ours = K.quantize(w, bits, group, torch.bfloat16)
    oracle = _hqq_oracle(w, bits, group, optimize=True)
    ours_err, hqq_err = _error(w, *ours, bits, group), _error(w, *oracle, bits, group)
    assert ours_err <= 1.01 * hqq_err
    assert (ours[0] == oracle[0]).float().mean() > 0.999  # the same solution, but for sums


@needs_native
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_min_max_start_equals_hqq_exactly(bits):
    w = _weight(64, 512, seed=1)
    ours = K.quantize(w, bits, 64, torch.bfloat16, optimize=False)
    for a, b in zip(ours, _hqq_oracle(w, bits, 64, optimize=False), strict=True):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_and_torch_paths_agree(dtype):
    w = _weight(80, 640, seed=2).to(dtype)
    native = K.quantize(w, 4, 64, dtype)
    fallback = K._quantize_torch(w, 4, 64, dtype, True)
    assert all(
        a.dtype == b.dtype and a.shape == b.shape for a, b in zip(native, fallback, strict=True)
    )
    assert (native[0] == fallback[0]).float().mean() > 0.999
    torch.testing.assert_close(native[2].float(), fallback[2].float(), rtol=1e-2, atol=1e-3)
    for a, b in zip(K.quantize(w, 4, 64, dtype, optimize=False),
                    K._quantize_torch(w, 4, 64, dtype, False), strict=True):  # fmt: skip
        assert torch.equal(a, b)


@needs_native
def test_result_does_not_depend_on_threads():
    w = _weight(64, 1024, seed=3)
    torch.set_num_threads(1)
    try:
        one = K.quantize(w, 4, 64, torch.bfloat16)
    finally:
        torch.set_num_threads(2)
    for a, b in zip(one, K.quantize(w, 4, 64, torch.bfloat16), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused(bad):
    w = _weight(16, 128)
    w[3, 77] = bad
    with pytest.raises(SubspecError, match="NaN or infinite"):
        K.quantize(w, 4, 64, torch.bfloat16)
    with pytest.raises(SubspecError, match="NaN or infinite"):
        K._quantize_torch(w, 4, 64, torch.bfloat16, True)


@needs_native
def test_bad_arguments_raise():
    with pytest.raises(SubspecError, match="bad arguments"):
        K.quantize(_weight(16, 128), 4, 48, torch.bfloat16)  # 48 does not divide 128

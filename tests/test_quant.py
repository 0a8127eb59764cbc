"""Tests for HQQ substitutes: kernels against the dequantized reference, error, memory, cache."""

import os
import shutil

import pytest
import torch
from helpers import require_kernel
from safetensors.torch import save_file
from torch import nn

import subspec.quant.cache as QC
import subspec.quant.linear as QL
from subspec import quant as Q
from subspec.files import safetensors_fingerprint
from subspec.kernels import native


@pytest.fixture
def vnni():
    """The int4 kernel: a skip where none can run here, a failure where it should."""
    return require_kernel(native.int4_vnni(), "int4_vnni")


needs_vnni = pytest.mark.usefixtures("vnni")


@pytest.fixture
def torch_int4(monkeypatch):
    """Substitutes made while this is active use torch's int4 kernel, not subspec's own."""
    monkeypatch.setattr(native, "int4_vnni", lambda: None)


def _weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=gen) * 0.02).to(torch.bfloat16)  # [out, in]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def _check_forward(m: QL.QuantLinear, bias: torch.Tensor | None = None, tol=8e-3) -> None:
    x = torch.randn(2, 3, m.in_features, dtype=torch.bfloat16)  # [batch, seq, in]
    ref = x.float() @ m.dequantize().T  # [batch, seq, out]
    if bias is not None:
        ref = ref + bias.float()
    y = m(x)
    assert y.shape == (2, 3, m.out_features) and y.dtype == torch.bfloat16
    assert _rel_err(y, ref) < tol  # default: a few bf16 ulps


@pytest.mark.parametrize(
    "out_f,in_f,group_size",
    [(64, 128, 64), (80, 256, 32), (208, 512, 128), (16, 256, 256), (1536, 192, 64)],
)
def test_int4_kernel_matches_dequantize(out_f, in_f, group_size, torch_int4):
    bias = torch.randn(out_f, dtype=torch.bfloat16)
    m = Q.quantize_linear(_weight(out_f, in_f), bias, group_size=group_size)
    assert m.layout == "int4_cpu"
    _check_forward(m, bias)


@pytest.mark.parametrize(
    "bits,group_size,out_f,layout",
    [
        (2, 64, 64, "int4_cpu"),  # 2/3 bits run the int4 kernel
        (3, 32, 48, "int4_cpu"),
        (4, 16, 64, "bitpack"),  # group size the int4 kernel rejects
        (4, 64, 72, "bitpack"),  # out_features not a multiple of 16
        (2, 64, 40, "bitpack"),
        (3, 16, 64, "bitpack"),
        (8, 64, 64, "bitpack"),  # grouped 8-bit: no per-group int8 kernel
        (8, 128, 64, "int8_rowwise"),  # one group per row
    ],
)
def test_other_layouts_match_dequantize(bits, group_size, out_f, layout):
    m = Q.quantize_linear(_weight(out_f, 128), None, bits=bits, group_size=group_size)
    assert m.layout == layout
    _check_forward(m)


@pytest.mark.parametrize("bits", Q.SUPPORTED_BITS)
def test_packing_round_trips(bits):
    """Every layout, and the cache's bitpack form, gives back the values it was built from."""
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (80, 256), generator=gen, dtype=torch.uint8)  # [out, in]
    sz = torch.rand(256 // 64, 80, 2, generator=gen).to(torch.bfloat16)  # [in / g, out, 2]
    assert torch.equal(QL.bitunpack(QL.bitpack(q, bits), bits), q)
    m = QL.QuantLinear(q, sz, None, bits=bits, group_size=64)
    assert torch.equal(m.unpacked(), q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_layout_model_agrees_with_kernel_unpack(bits, torch_int4):
    """Our model of torch's CPU nibble order matches what the kernel itself reads."""
    block = QL._cpu_int4_block_n()
    if block is None:
        pytest.skip("this CPU's int4pack layout is not modelled (kernel unpack is used)")
    m = Q.quantize_linear(_weight(208, 256), None, bits=bits)
    packed = QL._expand(m.qdata, bits)  # [out, in / 2]
    by_kernel = QL._unpack_int4_with_kernel(packed, m, torch._weight_int4pack_mm_for_cpu)
    assert torch.equal(by_kernel, QL._int4_cpu_layout_unpack(packed, block))


@needs_vnni
@pytest.mark.parametrize("rows", [1, 2, 5, 9])  # the kernel takes x's rows 4 at a time
@pytest.mark.parametrize(
    "out_f,in_f,group_size", [(64, 128, 64), (208, 512, 128), (1536, 256, 256)]
)
def test_vnni_kernel_is_exact_for_int8_activations(rows, out_f, in_f, group_size):
    """subspec's kernel computes sum_k W[n, k] x[k] with x rounded to int8 per 64 values and
    the zero-point term on the exact x: checked against that formula in float64."""
    m = Q.quantize_linear(_weight(out_f, in_f), None, group_size=group_size)
    assert m.layout == "int4_vnni"
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)) * 3  # [M, in]
    blocks = x.view(rows, -1, 64)  # [M, in / 64, 64], rounded in float32 as the kernel does
    amax = blocks.abs().amax(-1, keepdim=True)
    q_x = torch.round(blocks * (127 / amax)).double()  # round half to even, like lrintf
    x_int8 = (q_x * (amax / 127).double()).view(rows, in_f)
    sz = m.scales_and_zeros.double().transpose(0, 1)  # [out, in / g, 2]
    s, z = sz[..., :1], sz[..., 1:]
    q = m.unpacked().double().view(out_f, -1, group_size)  # [out, in / g, g]
    ref = (
        x_int8 @ (q * s).view(out_f, in_f).T
        + x.double() @ (z - 8 * s).expand_as(q).reshape(out_f, in_f).T
    )  # [M, out]
    y = native.int4_vnni_matmul(x, m.qdata, out_f, group_size)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


@needs_vnni
def test_vnni_module_close_to_dequantized_reference():
    bias = torch.randn(208, dtype=torch.bfloat16)
    m = Q.quantize_linear(_weight(208, 512), bias)
    assert m.layout == "int4_vnni"
    _check_forward(m, bias, tol=3e-2)  # int8 activations: about 1% of the largest output


def test_error_small_and_decreasing_with_bits():
    w = _weight(128, 256)
    errs = {}
    for bits in Q.SUPPORTED_BITS:
        deq = Q.quantize_linear(w, None, bits=bits).dequantize()
        errs[bits] = ((deq - w.float()).norm() / w.float().norm()).item()
    assert errs[2] > errs[3] > errs[4] > errs[8]
    assert errs[4] < 0.1 and errs[8] < 0.01


def test_bad_configs_raise_clearly():
    with pytest.raises(ValueError, match="bits=5"):
        Q.quantize_linear(_weight(64, 128), None, bits=5)
    with pytest.raises(ValueError, match="in_features=96"):
        Q.quantize_linear(_weight(64, 96), None, group_size=64)


@pytest.mark.parametrize("bits,group_size", [(2, 64), (3, 32), (4, 64), (4, 16), (8, 64), (8, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_nbytes_matches_tensors(bits, group_size, bias):
    b = torch.zeros(64, dtype=torch.bfloat16) if bias else None
    m = Q.quantize_linear(_weight(64, 128), b, bits=bits, group_size=group_size)
    assert m.nbytes() == Q.quantized_nbytes(64, 128, bits, group_size, bias=bias)


def test_module_moves_and_dtypes(torch_int4):
    m = Q.quantize_linear(_weight(64, 128), None)
    nn.Sequential(m).to("cpu")  # a move to where it is changes nothing
    assert m.layout == "int4_cpu"
    _check_forward(m)
    x = torch.randn(5, 128)  # float32 in -> float32 out
    assert m(x).dtype == torch.float32
    with pytest.raises(TypeError, match="compute_dtype"):
        m.to(torch.float16)


# ---------------------------------------------------------------------------------------------
# Cache


@pytest.fixture
def layers():
    bias = torch.randn(64, dtype=torch.bfloat16)
    return {
        "mlp.down": Q.quantize_linear(_weight(64, 128, 1), bias),
        "mlp.up": Q.quantize_linear(_weight(48, 64, 2), None, bits=3, group_size=32),
        "attn.o": Q.quantize_linear(_weight(32, 128, 3), None, bits=8, group_size=128),
    }


META = {"bits": 4, "group_size": 64, "fingerprint": "abc", "optimize": True}


def test_cache_round_trip_is_bit_identical(tmp_path, layers):
    path = tmp_path / "q.safetensors"
    Q.save_quantized(path, layers, META)
    assert os.listdir(tmp_path) == ["q.safetensors"]  # no temp file left behind
    loaded = Q.load_quantized(path, META)
    assert loaded.keys() == layers.keys()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    for name, m in layers.items():
        got = loaded[name]
        assert (got.layout, got.bits, got.group_size) == (m.layout, m.bits, m.group_size)
        assert torch.equal(got.unpacked(), m.unpacked())
        assert torch.equal(got.scales_and_zeros, m.scales_and_zeros)
        assert (got.bias is None) == (m.bias is None)
        assert got.bias is None or torch.equal(got.bias, m.bias)
        xi = x[:, : m.in_features]
        assert torch.equal(got(xi), m(xi))


def test_cache_missing_or_mismatched_returns_none(tmp_path, layers, monkeypatch):
    path = tmp_path / "q.safetensors"
    assert Q.load_quantized(path, META) is None
    Q.save_quantized(path, layers, META)
    assert Q.load_quantized(path, {**META, "bits": 3}) is None
    assert Q.load_quantized(path, {**META, "fingerprint": "abd"}) is None
    monkeypatch.setattr(QC, "FORMAT_VERSION", QC.FORMAT_VERSION + 1)
    assert Q.load_quantized(path, META) is None
    monkeypatch.undo()
    monkeypatch.setattr(QC, "QUANTIZER", "another-solver")
    assert Q.load_quantized(path, META) is None


def test_cache_truncated_or_corrupted_returns_none(tmp_path, layers):
    path = tmp_path / "q.safetensors"
    Q.save_quantized(path, layers, META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert Q.load_quantized(path, META) is None
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit in the tensor data
    assert Q.load_quantized(path, META) is None
    path.write_bytes(b"\x10" + data[1:])  # header length no longer matches
    assert Q.load_quantized(path, META) is None
    path.write_bytes(b"not a safetensors file")
    assert Q.load_quantized(path, META) is None
    path.write_bytes(data)
    assert Q.load_quantized(path, META) is not None


def test_fingerprint_tracks_checkpoint(tmp_path):
    shard = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, shard)
    first = safetensors_fingerprint([shard])
    assert safetensors_fingerprint([shard]) == first
    save_file({"w": torch.zeros(4, 5)}, shard)
    assert safetensors_fingerprint([shard]) != first


def test_fingerprint_tells_same_shaped_checkpoints_apart(tmp_path):
    """Another checkpoint of the same shapes (a fine-tune, a re-conversion), written in place
    or elsewhere, has the same header: its caches must still not be the first one's."""
    shard = tmp_path / "a" / "model.safetensors"
    shard.parent.mkdir()
    save_file({"w": torch.zeros(4, 4)}, shard)
    first = safetensors_fingerprint([shard])
    other = tmp_path / "b" / "model.safetensors"
    other.parent.mkdir()
    save_file({"w": torch.ones(4, 4)}, other)
    assert safetensors_fingerprint([other]) != first
    save_file({"w": torch.zeros(4, 4).index_fill_(0, torch.tensor([2]), 1.0)}, shard)
    assert safetensors_fingerprint([shard]) != first  # rewritten in place with other values


def test_fingerprint_survives_touch_and_copy(tmp_path):
    """A `touch` or a copy of the checkpoint keeps its caches (they cost minutes to rebuild)."""
    shard = tmp_path / "a" / "model.safetensors"
    shard.parent.mkdir()
    save_file({"w": torch.randn(64, 64)}, shard)
    first = safetensors_fingerprint([shard])
    os.utime(shard, ns=(0, 0))
    assert safetensors_fingerprint([shard]) == first
    copy = tmp_path / "b" / "model.safetensors"
    copy.parent.mkdir()
    shutil.copy(shard, copy)
    assert safetensors_fingerprint([copy]) == first


def test_cuda_layout_choice_and_held_bytes():
    from types import SimpleNamespace

    cuda = torch.device("cuda")

    def layout(bits, dtype=torch.bfloat16, in_features=128, group=64):
        m = SimpleNamespace(bits=bits, group_size=group, out_features=32,
                            in_features=in_features, compute_dtype=dtype)  # fmt: skip
        return QL._choose_layout(m, cuda)

    assert [layout(b) for b in (2, 3, 4)] == ["int4_cuda"] * 3  # no per-call dequantization
    assert layout(4, torch.float32) == layout(8) == layout(4, in_features=48, group=16)
    assert layout(8) == "bitpack"
    # 2/3-bit values sit in 4-bit nibbles on CUDA: the planner counts what is held
    held = Q.quantized_nbytes(32, 128, 2, 64, device="cuda")
    assert held == Q.quantized_nbytes(32, 128, 4, 64) > Q.quantized_nbytes(32, 128, 2, 64)


def test_bitpack_matmul_in_row_blocks_matches_reference(monkeypatch):
    monkeypatch.setattr(QL, "BITPACK_SCRATCH_ELEMENTS", 3 * 64)  # 3 rows per block
    q = torch.randint(0, 256, (10, 64), dtype=torch.uint8)
    sz = torch.randn(2, 10, 2) * 0.01  # two groups per row: not int8_rowwise
    lin = QL.QuantLinear(q, sz, None, bits=8, group_size=32)
    assert lin.layout == "bitpack"
    x = torch.randn(5, 64)
    torch.testing.assert_close(lin(x), x @ lin.dequantize().T)

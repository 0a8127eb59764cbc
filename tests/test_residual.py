"""Streaming a bf16 weight as its difference from the resident 4-bit substitute
(kernels/residual.py): the codec rebuilds every bit, whatever the weight, on both paths; the
plan sizes its buffers from a bound the encoder enforces; SubSpec streaming that way emits
vanilla's tokens, greedy and sampled, and falls back to whole layers; a rebuilt substitute
never meets a stale residual file. On a tiny Qwen2 wide enough for the form to pay (the
tests' usual 64-wide layers are smaller whole, padded to 4 KB a tensor)."""

import os

import pytest
import torch
from helpers import generate, make_runtime, minimum_budget, require_kernel, write_tiny

from subspec import sizes
from subspec.config import SamplingConfig, SpecConfig
from subspec.files import cache_root
from subspec.kernels import exact, native, residual
from subspec.model.checkpoint import Checkpoint
from subspec.model.config import ModelConfig
from subspec.offload.layer_file import layer_path, plan_layout
from subspec.quant.hqq import quantize_linear
from subspec.runtime.weights import fingerprint, residual_dir, residual_sources


@pytest.fixture
def kernels():
    """The residual codec and the int4 kernel: skips where they cannot run here, failures
    where they should."""
    require_kernel(native.int4_vnni(), "int4_vnni")
    return require_kernel(native.residual(), "residual")


codec = pytest.mark.usefixtures("kernels")


@pytest.fixture
def simd_codec(kernels):
    """The codec's AVX-512 path (skipped where the CPU lacks it)."""
    if not residual.has_simd():
        pytest.skip("no AVX-512 (F, BW, VL, VBMI2) here")


@pytest.fixture
def residual_streaming(simd_codec):
    """Residual streaming on (skipped where it is off here)."""
    if not residual.available():
        pytest.skip("residual streaming is off here")


streams = pytest.mark.usefixtures("residual_streaming")
SPEC = SpecConfig(depth=5, width=2)
WIDE = {"hidden_size": 256, "intermediate_size": 512}  # head_dim 64, qkv bias
PROMPTS = ("hello world", "this is a test")


def _wide_qwen2(path, seed: int = 0):
    return write_tiny("qwen2", path, seed, shape=WIDE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _wide_qwen2(tmp_path_factory.mktemp("wide-qwen2"))


@pytest.fixture(scope="module")
def vanilla(model_dir):
    return make_runtime(model_dir, dtype="bfloat16", numerics="exact")


def _weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """Gaussian weights with the awkward values: zeros of both signs, tiny and large ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w.view(-1)[::97] = 0.0
    w.view(-1)[::89] = -0.0
    w.view(-1)[::83] *= 1e-6
    w.view(-1)[::79] *= 40.0
    return w.to(torch.bfloat16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@codec
@pytest.mark.parametrize("out_f, in_f, group", [(48, 192, 64), (32, 256, 128), (1536, 64, 64)])
@pytest.mark.parametrize("fast", [True, False], ids=["simd", "scalar"])
def test_rebuilds_every_bit(out_f, in_f, group, fast, request):
    if fast:
        request.getfixturevalue("simd_codec")
    w = _weight(out_f, in_f, out_f + in_f)
    sub = quantize_linear(w, None, bits=4, group_size=group, optimize=False)
    parts = residual.encode(w, sub)
    out = torch.full((out_f * in_f + 5,), float("nan"), dtype=torch.bfloat16)
    assert torch.equal(_bits(residual.decode(parts, sub, out, fast)), _bits(w))
    escaped = int((parts["residual"] == -128).sum())
    assert parts["tile_escapes"][-1] == escaped
    assert torch.all(parts["tile_escapes"].diff() >= 0)


@codec
def test_most_gaussian_weights_take_one_byte():
    w = (torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    parts = residual.encode(w, quantize_linear(w, None, bits=4, group_size=64))
    assert 0 < parts["tile_escapes"][-1] < 0.1 * w.numel()


@codec
def test_a_weight_far_from_its_substitute_escapes_but_still_rebuilds():
    w = _weight(64, 128, 1)
    other = quantize_linear(_weight(64, 128, 2) * 50, None, bits=4, group_size=64, optimize=False)
    parts = residual.encode(w, other)
    assert parts["tile_escapes"][-1] > 0.5 * w.numel()
    out = torch.empty(w.numel(), dtype=torch.bfloat16)
    for fast in (True, False) if residual.has_simd() else (False,):
        assert torch.equal(_bits(residual.decode(parts, other, out, fast)), _bits(w))


@codec
def test_encode_and_decode_refuse_what_does_not_match():
    w = _weight(32, 128, 3)
    sub = quantize_linear(_weight(48, 128, 3), None, bits=4, group_size=64, optimize=False)
    with pytest.raises(ValueError, match="does not match"):
        residual.encode(w, sub)
    with pytest.raises(ValueError, match="bf16"):
        residual.encode(w.float(), quantize_linear(w, None, bits=4, optimize=False))
    parts = residual.encode(_weight(48, 128, 4), sub)
    with pytest.raises(ValueError, match="does not hold"):
        residual.decode(parts, sub, torch.empty(48 * 128 - 1, dtype=torch.bfloat16))


@codec
@pytest.mark.parametrize("fast", [True, False], ids=["simd", "scalar"])
def test_a_corrupted_residual_form_is_refused_not_read_past(fast, request):
    """Escape tables that do not start at 0, decrease, or reach past the escapes, and residuals
    that ask for more or fewer escapes than their tile's: an exception, never a stray read."""
    if fast:
        request.getfixturevalue("simd_codec")
    w = _weight(64, 256, 5)
    sub = quantize_linear(w, None, bits=4, group_size=64, optimize=False)
    parts = residual.encode(w, sub)
    out = torch.empty(w.numel(), dtype=torch.bfloat16)
    tiles, resid = parts["tile_escapes"], parts["residual"]
    assert tiles[-1] > tiles[1] > 0
    broken = [
        {"tile_escapes": tiles + 1},
        {"tile_escapes": torch.cat([tiles[:1], tiles[2:3], tiles[1:2], tiles[3:]])},
        {"escapes": parts["escapes"][:-1].clone()},
        {"residual": torch.where(resid == -128, 0, resid).to(torch.int8)},  # escapes unused
        {"residual": torch.full_like(resid, -128)},  # every weight escapes
    ]
    for change in broken:
        with pytest.raises(ValueError, match="inconsistent"):
            residual.decode({**parts, **change}, sub, out, fast)
    assert torch.equal(_bits(residual.decode(parts, sub, out, fast)), _bits(w))


@pytest.fixture
def fused(simd_codec):
    """The exact linear that rebuilds its weight block by block (skipped on AMX machines)."""
    require_kernel(native.bf16_exact(), "bf16_exact")
    if not sizes.rebuilds_in_matmul(exact=True):
        pytest.skip("bf16 takes the AMX path here, which the fused kernel does not compute")


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize("rows", [1, 3, 33, 130])
@pytest.mark.parametrize(  # one block; three of 64 rows and a ragged one; blocks of one tile
    "out_f, in_f, bias", [(48, 192, True), (176, 2048, False), (48, 8960, True)]
)
def test_rebuilding_inside_the_exact_linear_gives_its_bits(out_f, in_f, bias, rows):
    """The fused kernel rebuilds each block of rows into a thread's buffer and runs the exact
    kernel on it: the output is exact_linear's over the whole rebuilt weight, bit for bit."""
    g = torch.Generator().manual_seed(rows)
    w = _weight(out_f, in_f, out_f + in_f)
    sub = quantize_linear(w, None, bits=4, group_size=64, optimize=False)
    parts = residual.encode(w, sub)
    x = torch.randn(rows, in_f, generator=g).bfloat16()
    b = torch.randn(out_f, generator=g).bfloat16() if bias else None
    got = exact.exact_residual_linear(x, parts, sub, b)
    assert torch.equal(_bits(got), _bits(exact.exact_linear(x, w, b)))
    with pytest.raises(ValueError, match="inconsistent"):
        exact.exact_residual_linear(x, {**parts, "tile_escapes": parts["tile_escapes"] + 1}, sub)


@pytest.mark.usefixtures("fused")
def test_rebuilding_inside_the_fp32_paths_gives_their_bits(monkeypatch):
    """On a CPU with the codec's AVX-512 but no AVX512_BF16 (Ice Lake) bf16 takes the fma
    path, whose x is fp32: the fused kernel follows whichever path the CPU picks."""
    if not exact.has_fma():
        pytest.skip("no AVX2 + FMA here")
    w = _weight(176, 2048, 6)
    sub = quantize_linear(w, None, bits=4, group_size=64, optimize=False)
    x = torch.randn(5, 2048, generator=torch.Generator().manual_seed(6)).bfloat16()
    for path in (exact.FMA, exact.PORTABLE):
        monkeypatch.setattr(exact, "kernel_path", lambda *dtypes, path=path: path)
        want = exact._native_linear(x, w, None, torch.bfloat16, path)
        got = exact.exact_residual_linear(x, residual.encode(w, sub), sub)
        assert torch.equal(_bits(got), _bits(want))


@streams
@pytest.mark.parametrize("share", [0.7, 0.0])
def test_greedy_and_sampled_tokens_equal_vanilla(model_dir, vanilla, share):
    full = vanilla.placement.resident_bytes
    budget = max(int(share * full), minimum_budget(model_dir, ("subspec",), "bfloat16", SPEC))
    runtime = make_runtime(model_dir, ("subspec",), budget, "bfloat16", SPEC)
    assert runtime.streaming.layers.rebuild is not None and runtime.placement.residual_stream
    rebuild = runtime.streaming.layers.rebuild  # rebuilt inside the matmul where it can be
    assert (rebuild.buffer is None) == rebuild.in_linear == sizes.rebuilds_in_matmul(exact=True)
    for prompt in PROMPTS:
        want = generate(vanilla, "vanilla", prompt, 32)[0]
        assert generate(runtime, "subspec", prompt, 32)[0] == want
    for seed in range(4):
        sampling = SamplingConfig(temperature=1.0, top_p=0.95, seed=seed)
        want = generate(vanilla, "vanilla", PROMPTS[1], 16, sampling)[0]
        assert generate(runtime, "subspec", PROMPTS[1], 16, sampling)[0] == want


@streams
def test_staging_bound_holds_the_layer_files(model_dir):
    runtime = make_runtime(model_dir, ("subspec",), _streaming_budget(model_dir),
                           "bfloat16", SPEC)  # fmt: skip
    streaming = runtime.streaming
    assert streaming.layers.rebuild is not None
    cfg = ModelConfig.from_dir(model_dir)
    bound = sizes.residual_layer_nbytes(cfg, "bfloat16", SPEC.group_size)
    assert runtime.placement.buffer_bytes == bound < sizes.layer_nbytes(cfg, "bfloat16")
    for unit in runtime.placement.streamed_layers:
        assert streaming.layers.manifests[unit].total_bytes <= bound
    # a layer at the most escapes allowed still fits: its files' tensors, escapes grown
    layer = runtime.placement.streamed_layers[0]
    with Checkpoint(model_dir) as ckpt:
        t = residual_sources(
            ckpt, cfg, [layer], torch.bfloat16, runtime.streaming.layers.rebuild.substitutes
        )[layer]()
    weights = sum(o * i for o, i in cfg.linear_shapes.values())
    most = int(sizes.RESIDUAL_ESCAPE_SHARE * weights)  # all in one linear, one in the others
    for name in ("o", "gate_up", "down"):
        t[f"{name}.escapes"] = torch.zeros(1, dtype=torch.int16)
    t["qkv.escapes"] = torch.zeros(most - 3, dtype=torch.int16)
    assert plan_layout(t).total_bytes <= bound


@streams
def test_plain_stream_and_fallback_emit_the_same_tokens(model_dir, tmp_path, monkeypatch):
    budget = _streaming_budget(model_dir)
    rebuilt = make_runtime(model_dir, ("subspec",), budget, "bfloat16", SPEC)
    plain_spec = SpecConfig(depth=5, width=2, residual_stream=False)
    plain = make_runtime(model_dir, ("subspec",), budget, "bfloat16", plain_spec)
    assert plain.streaming.layers.rebuild is None
    cfg = ModelConfig.from_dir(model_dir)
    assert plain.placement.buffer_bytes == sizes.layer_nbytes(cfg, "bfloat16")
    for prompt in PROMPTS:
        want = generate(plain, "subspec", prompt, 24)[0]
        assert generate(rebuilt, "subspec", prompt, 24)[0] == want
    # a model whose weights escape their substitutes too often streams whole (files not yet
    # written for this checkpoint: the encoder finds it out)
    other = _wide_qwen2(tmp_path / "other", seed=7)
    monkeypatch.setattr(sizes, "RESIDUAL_ESCAPE_SHARE", 0.0)
    monkeypatch.setattr("subspec.runtime.weights.RESIDUAL_ESCAPE_SHARE", 0.0)
    fallback = make_runtime(other, ("subspec",), _streaming_budget(other), "bfloat16", SPEC)
    assert fallback.streaming.layers.rebuild is None and not fallback.placement.residual_stream
    vanilla = make_runtime(other, dtype="bfloat16", numerics="exact")
    prompt = "the cat sat on the mat"
    assert (
        generate(fallback, "subspec", prompt, 24)[0] == generate(vanilla, "vanilla", prompt, 24)[0]
    )


@codec
def test_without_the_codec_layers_stream_whole(model_dir, vanilla, monkeypatch):
    monkeypatch.setattr(residual, "available", lambda: False)
    runtime = make_runtime(model_dir, ("subspec",), _streaming_budget(model_dir), "bfloat16", SPEC)
    assert runtime.streaming.layers.rebuild is None and not runtime.placement.residual_stream
    want = generate(vanilla, "vanilla", PROMPTS[0], 24)[0]
    assert generate(runtime, "subspec", PROMPTS[0], 24)[0] == want


@streams
def test_residual_files_never_meet_another_substitute(tmp_path):
    """A substitute rebuilt deletes its layer's residual file; a residual file made against
    another substitute (here: another layer's, copied over it) is found by its sample."""
    model = _wide_qwen2(tmp_path / "model", seed=11)
    budget = _streaming_budget(model)
    first = make_runtime(model, ("subspec",), budget, "bfloat16", SPEC)
    layer, other = first.placement.streamed_layers[:2]
    with Checkpoint(model) as ckpt:
        name = f"{fingerprint(ckpt)}-bfloat16"
    subs_dir = cache_root() / "offload" / name / "substitutes-b4-g64-hqq"
    files = residual_dir(subs_dir, first.placement.buffer_bytes)
    resid_file = layer_path(files, layer)
    vanilla = make_runtime(model, dtype="bfloat16", numerics="exact")
    want = generate(vanilla, "vanilla", PROMPTS[0], 24)[0]

    os.utime(resid_file, (0, 0))  # a file written anew has a recent time
    (subs_dir / f"layer_{layer:05d}.safetensors").write_bytes(b"not a safetensors file")
    second = make_runtime(model, ("subspec",), budget, "bfloat16", SPEC)  # re-quantizes
    assert resid_file.stat().st_mtime > 0  # deleted with the old substitute, written anew
    assert generate(second, "subspec", PROMPTS[0], 24)[0] == want

    resid_file.write_bytes(layer_path(files, other).read_bytes())
    os.utime(resid_file, (0, 0))
    third = make_runtime(model, ("subspec",), budget, "bfloat16", SPEC)
    assert resid_file.stat().st_mtime > 0
    assert generate(third, "subspec", PROMPTS[0], 24)[0] == want


def _streaming_budget(model_dir) -> int:
    """A budget at which some layers of a tiny model stream under SubSpec."""
    full = make_runtime(model_dir, dtype="bfloat16").placement.resident_bytes
    plain = SpecConfig(depth=5, width=2, residual_stream=False)
    smallest = [minimum_budget(model_dir, ("subspec",), "bfloat16", s) for s in (SPEC, plain)]
    return max(int(0.7 * full), *smallest)

"""Row invariance of subspec.exact, and of the torch ops the forward pass uses unchanged: row i
of an n-row call must be bit-identical to a 1-row call of the same input, for every n."""

import pytest
import torch
import torch.nn.functional as F
from helpers import require_kernel

from subspec.kernels import exact
from subspec.kernels.exact import exact_attention, exact_linear
from subspec.model.forward import apply_rope, attention, rms_norm

ROW_COUNTS = (1, 2, 6, 33, 289, 512)


@pytest.fixture
def kernel():
    """The exact kernel: a skip where none can be built here, a failure where it should."""
    return require_kernel(exact._lib(), "bf16_exact")


needs_kernel = pytest.mark.usefixtures("kernel")


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    """Run each test with the C kernel and with the pure-torch fallback."""
    if request.param == "native":
        require_kernel(exact._lib(), "bf16_exact")
    if request.param == "torch":
        monkeypatch.setattr(exact, "_lib", lambda: None)
    return request.param


def _mismatched_rows(f, x: torch.Tensor, counts=ROW_COUNTS) -> list[tuple[int, int]]:
    """(n, i) for every row i of f(x[:n]) that differs from f(x[i:i+1]); also tries the rows in
    reverse order, so that each row sits at another position. f maps [T, ...] -> [T, ...]."""
    single = torch.cat([f(x[i : i + 1]) for i in range(max(counts))])
    bad = []
    for n in counts:
        for batch, rows in ((x[:n], range(n)), (x[:n].flip(0), range(n - 1, -1, -1))):
            y = f(batch)
            bad += [(n, i) for j, i in enumerate(rows) if not torch.equal(y[j], single[i])]
    return bad


def _linear_case(n: int, k: int, with_bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)  # [out, in]
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if with_bias else None
    x = torch.randn(max(ROW_COUNTS), k, generator=gen).to(torch.bfloat16)  # [T, in]
    return x, w, b


def test_the_check_catches_a_row_dependent_result():
    """The checker fails on a function whose rows depend on the batch, and (on the machines
    tried) on torch's bf16 GEMM, the reason exact_linear exists."""
    assert _mismatched_rows(lambda a: a - a.mean(0), torch.randn(512, 8))
    x, w, _ = _linear_case(1536, 1536, False)
    if not _mismatched_rows(lambda a: F.linear(a, w), x[:33], (1, 33)):
        pytest.skip("torch's bf16 GEMM happens to be row-invariant on this machine")


@pytest.mark.parametrize("n,k", [(37, 77), (100, 33), (64, 256), (20, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_exact_linear_is_row_invariant(n, k, with_bias, out_dtype, x_dtype, backend):
    x, w, b = _linear_case(n, k, with_bias)
    x = x.to(x_dtype)
    counts = ROW_COUNTS if backend == "native" else (1, 6, 33)
    assert not _mismatched_rows(lambda a: exact_linear(a, w, b, out_dtype=out_dtype), x, counts)
    y = exact_linear(x[:6], w, b, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (6, n)


@needs_kernel
@pytest.mark.parametrize("path", [exact.AMX, exact.DPBF16, exact.FMA, exact.PORTABLE])
def test_every_kernel_path_is_row_invariant_and_thread_independent(path):
    """A shape big enough to split over threads and cache blocks; each arithmetic path."""
    if path == exact.AMX and not exact.has_amx():
        pytest.skip("no AMX-BF16 here")
    if path == exact.DPBF16 and not exact.has_dpbf16():
        pytest.skip("no AVX512_BF16 here")
    if path == exact.FMA and not exact.has_fma():
        pytest.skip("no AVX2 + FMA here")
    x, w, b = _linear_case(2051, 1537, True)  # K not a multiple of any chunk: the tails too

    def f(a):
        return exact._native_linear(a, w, b, torch.float32, path)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the kernel splits N over threads and blocks
        assert not _mismatched_rows(f, x[:64], (1, 2, 6, 33, 64))
        two = f(x[:33])
        torch.set_num_threads(1)
        assert torch.equal(f(x[:33]), two)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("path", [exact.DPBF16, exact.FMA, exact.PORTABLE])
def test_nan_bits_do_not_depend_on_the_rows(path):
    """Where two NaNs meet in a sum, x86 keeps one by operand order: a row's NaN bits must not
    depend on whether it ran in a full tile or alone (torch.equal cannot see this: NaN != NaN)."""
    if path == exact.DPBF16 and not exact.has_dpbf16():
        pytest.skip("no AVX512_BF16 here")
    if path == exact.FMA and not exact.has_fma():
        pytest.skip("no AVX2 + FMA here")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=gen).to(torch.bfloat16)  # [T, in]
    x.view(torch.int16)[:, 0] = 0x7FC1  # a quiet NaN with a payload: NaN times anything
    x[:, 2] = 0.0
    w = torch.randn(4, 64, generator=gen).to(torch.bfloat16)  # [out, in]
    w[:, 2] = float("inf")  # 0 x inf: the default NaN, in another lane than the payload's

    def bits(a):
        return exact._native_linear(a, w, None, torch.float32, path).view(torch.int32)

    single = torch.cat([bits(x[i : i + 1]) for i in range(6)])
    for n in range(1, 7):  # 4 rows: one tile; 5, 6: a tile and rows alone
        assert torch.equal(bits(x[:n]), single[:n]), n


@pytest.mark.parametrize("with_bias", [False, True])
def test_exact_linear_is_close_to_fp32_linear(with_bias, backend):
    x, w, b = _linear_case(300, 777, with_bias)
    ref = F.linear(x[:33].float(), w.float(), None if b is None else b.float())
    y = exact_linear(x[:33], w, b, out_dtype=torch.float32)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    y16 = exact_linear(x[:33], w, b)  # rounded once: within half a bf16 ulp of y
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y.to(torch.bfloat16))
    assert exact_linear(x[:6].reshape(2, 3, -1), w, b).shape == (2, 3, 300)


def _tree_mask(prefix: int, nodes: int, seed: int) -> torch.Tensor:
    """[nodes, prefix + nodes] bool: every node sees the prefix, its ancestors and itself."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(nodes, prefix + nodes, dtype=torch.bool)
    mask[:, :prefix] = True
    for i in range(nodes):
        mask[i, prefix + i] = True
        if i:
            parent = int(torch.randint(0, i, (1,), generator=gen))
            mask[i, prefix:] |= mask[parent, prefix:]
    return mask


@pytest.mark.parametrize("hq,hkv,d", [(12, 2, 128), (9, 3, 64), (4, 4, 40)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tree_attention_equals_sequential_attention(hq, hkv, d, dtype, backend):
    """Node i of a masked tree call == that query alone over prefix + its ancestors + itself,
    stored contiguously (what sequential decoding of that path attends to)."""
    prefix, nodes = 57, 33
    gen = torch.Generator().manual_seed(hq * d)
    q = torch.randn(hq, nodes, d, generator=gen).to(dtype)  # [Hq, T, D]
    keys = torch.randn(hkv, prefix + nodes, d, generator=gen).to(dtype)  # [Hkv, S, D]
    values = torch.randn(hkv, prefix + nodes, d, generator=gen).to(dtype)
    mask = _tree_mask(prefix, nodes, seed=d)
    tree = exact_attention(q, keys, values, mask)
    assert tree.dtype == dtype and tree.shape == q.shape
    for i in range(nodes):
        kept = mask[i].nonzero().squeeze(1)
        alone = exact_attention(
            q[:, i : i + 1], keys[:, kept].contiguous(), values[:, kept].contiguous(), None
        )
        assert torch.equal(tree[:, i], alone[:, 0]), f"node {i}"
    ref = attention(q.float(), keys.float(), values.float(), mask)
    assert (tree.float() - ref).abs().max() < (2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_attention_without_mask_is_row_invariant(backend):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(12, 33, 128, generator=gen).to(torch.bfloat16)  # [Hq, T, D]
    keys = torch.randn(2, 500, 128, generator=gen).to(torch.bfloat16)  # [Hkv, S, D]
    values = torch.randn(2, 500, 128, generator=gen).to(torch.bfloat16)

    def f(rows):  # [T, Hq, D] -> [T, Hq, D]
        return exact_attention(rows.transpose(0, 1), keys, values, None).transpose(0, 1)

    assert not _mismatched_rows(f, q.transpose(0, 1), (1, 2, 6, 33))


@pytest.mark.parametrize("d", [128, 40])  # the AVX-512 and the portable paths
def test_a_query_that_attends_to_no_key_gets_zeros(d, backend):
    gen = torch.Generator().manual_seed(d)
    q = torch.randn(4, 3, d, generator=gen)  # [Hq, T, D]
    keys, values = torch.randn(2, 2, 5, d, generator=gen)  # [Hkv, S, D] each
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out = exact_attention(q, keys, values, mask)
    assert torch.equal(out[:, 1], torch.zeros(4, d))
    assert torch.isfinite(out).all() and out[:, 0].abs().sum() > 0


# The ops below stay as they are in model.py: torch already computes each row alone on CPU.


def test_rms_norm_is_row_invariant():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(512, 1536, generator=gen).to(torch.bfloat16)  # [T, H]
    w = torch.randn(1536, generator=gen).to(torch.bfloat16)
    assert not _mismatched_rows(lambda a: rms_norm(a, w, 1e-6), x)


def test_rope_and_residual_add_are_row_invariant():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 12, 128, generator=gen).to(torch.bfloat16)  # [T, heads, D]
    cs = torch.randn(512, 2, 128, generator=gen).to(torch.bfloat16)  # [T, (cos, sin), D]

    def rope(rows):  # [T, heads + 2, D] -> [T, heads, D]
        q, cos, sin = rows[:, :12].transpose(0, 1), rows[:, 12], rows[:, 13]
        return apply_rope(q, cos, sin).transpose(0, 1)

    assert not _mismatched_rows(rope, torch.cat([x, cs], 1))
    assert not _mismatched_rows(lambda rows: rows[:, 0] + rows[:, 1], x[:, :2])


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "tempered_softmax"])
def test_softmax_over_the_vocabulary_is_row_invariant(op):
    fns = {
        "softmax": lambda a: a.softmax(-1),
        "log_softmax": lambda a: a.log_softmax(-1),
        "tempered_softmax": lambda a: (a / 0.2).softmax(-1),
    }
    logits = torch.randn(33, 151936, generator=torch.Generator().manual_seed(4))  # [T, V]
    assert not _mismatched_rows(fns[op], logits, (1, 2, 6, 33))

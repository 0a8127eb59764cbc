"""HQQ low-bit substitutes for linear layers, their matmul kernels and their on-disk cache.

A substitute stores ``W ≈ (q - off) * s + z`` per group of ``group_size`` input columns, with
``q`` in ``[0, 2**bits)``, ``off = 8`` for up to 4 bits (128 for 8 bits) and ``s``/``z`` in
``compute_dtype`` kept as ``scales_and_zeros[in / group_size, out, 2]``. That is exactly the
convention of torch's int4 kernels (``_weight_int4pack_mm*``: ``(q - 8) * scale + zero``), so
2-, 3- and 4-bit layers all run the real int4 kernel. HQQ's own convention
``W ≈ (q - z_hqq) * s`` converts as ``z = (off - z_hqq) * s``.

Layouts of the quantized values held in memory (``QuantLinear.layout``):

- ``int4_cpu``: torch's CPU int4pack, fed to ``_weight_int4pack_mm_for_cpu``. For 2 and 3 bits
  the unused high bits of every nibble are squeezed out (byte-locally, whatever torch's nibble
  order is) and put back on each call: a few bitwise passes, no dequantization.
- ``int4_vnni``: 4 bits on x86 CPUs with AVX512-VNNI or AVX2 (and a C compiler): subspec's own
  kernel (``native.py``, ``csrc/int4_vnni.c``) quantizes the activations to int8 per 64 values and
  multiplies with ``vpdpbusd`` (26 substitute layers and the draft head at 2 rows, weights
  from DRAM: ~40 ms, against ~62 ms for its first version and ~1.5x that for torch's int4
  kernel), at about 1% error from the int8 activations (a draft's numerics need not match
  the target's). The values are interleaved in tiles of 16 rows, each tile's scales beside
  them, so that each 32-bit lane of a ``vpdpbusd`` is one output row and a thread reads one
  stream (the layout is in the C file); it takes float32 or bf16 ``x`` as it is and adds the
  bias itself, so a forward has no casts around it. On AVX2 the same layout runs on pairs of
  256-bit registers, ``vpdpbusd`` done as ``vpmaddubsw`` + ``vpmaddwd`` (on a Zen 3 EPYC: 26
  layers at 2 rows ~59 ms, torch's int4 kernel ~148 ms).
- ``int4_cuda``: torch's CUDA tiled int4pack, fed to ``_weight_int4pack_mm`` (bf16 only). 2/3
  bits are held in its 4-bit nibbles, so they take 4 bits per value on CUDA (``sizes.held_bits``).
- ``int8_rowwise``: ``int8 q - 128`` for 8 bits with one group per row (CPU), fed to
  ``_weight_int8pack_mm`` plus a rank-1 zero-point correction.
- ``bitpack``: ``bits`` bytes per 8 values along ``in``; dequantized on every call, in row
  blocks of bounded size (slow). Used for grouped 8 bits (e.g. an 8-bit draft head, on CPU and
  CUDA), for float32 on CUDA, and for shapes the int4 kernels reject (``out % 16``, odd group
  sizes, ``in % 32`` on CUDA).

The cache always stores the device-independent ``bitpack`` form.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from subspec.kernels import native
from subspec.sizes import BITPACK_SCRATCH_ELEMENTS, INT4_GROUP_SIZES, int4_cuda_fits

log = logging.getLogger(__name__)

_UNPACK_EYE_ROWS = 1024
_PACK_CHUNK_BYTES = 8 << 20  # values packed into the int4_vnni layout at a time


@dataclass(frozen=True)
class Bitpacked:
    """Quantized values in the cache's ``bitpack`` form, unpacked a block of rows at a time
    where QuantLinear packs them for the int4_vnni kernel, so that loading never holds a whole
    layer's unpacked values (the 7B's draft head: 545 MB) beside its packed ones."""

    data: Tensor  # [out, in * bits / 8] uint8
    bits: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.in_features

    @property
    def device(self) -> torch.device:
        return self.data.device

    def rows(self, start: int, end: int) -> Tensor:
        """``q[start:end]`` uint8."""
        return bitunpack(self.data[start:end], self.bits).view(-1, self.in_features)


class QuantLinear(nn.Module):
    """A linear layer with HQQ-quantized weights; see the module docstring for the format.

    Moving it (``.to(device)``, ``.cuda()``, ``.cpu()``, also through a parent module) repacks
    the values for the target device's kernel. Its dtype is fixed at construction.
    """

    def __init__(
        self,
        q: Tensor | Bitpacked,
        scales_and_zeros: Tensor,
        bias: Tensor | None,
        *,
        bits: int,
        group_size: int,
    ) -> None:
        """Build from the values ``q[out, in]`` (uint8, or as the cache stores them) and
        ``scales_and_zeros``."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits, self.group_size = bits, group_size
        self.compute_dtype = scales_and_zeros.dtype
        self.bias = bias  # [out] or None
        self._pack(q, scales_and_zeros.contiguous())

    @property
    def device(self) -> torch.device:
        """Device holding the quantized tensors."""
        return self.qdata.device

    @property
    def scales_and_zeros(self) -> Tensor:
        """``[in / g, out, 2]`` in ``compute_dtype`` (for ``int4_vnni``, a copy out of qdata)."""
        if self._scales_and_zeros is None:
            return _vnni_scales(self)
        return self._scales_and_zeros

    def forward(self, x: Tensor) -> Tensor:
        """``x[..., in] -> [..., out]`` in ``x``'s dtype, computed in ``compute_dtype``."""
        if self.layout == "int4_vnni":  # takes float32 or bf16 x as it is, adds the bias itself
            y = _matmul_int4_vnni(x.reshape(-1, self.in_features).contiguous(), self)
            return y.reshape(*x.shape[:-1], self.out_features)
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()  # [M, in]
        y = _MATMUL[self.layout](x2, self)  # [M, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def unpacked(self) -> Tensor:
        """The quantized values ``q[out, in]`` as uint8."""
        return _UNPACK[self.layout](self.qdata, self)

    def bitpacked(self) -> Tensor:
        """The values in the cache's ``bitpack`` form ``[out, in * bits / 8]``; from the
        int4_vnni layout a block of tiles at a time (no whole unpacked copy)."""
        if self.layout != "int4_vnni":
            return bitpack(self.unpacked(), self.bits)
        out = torch.empty(self.out_features, self.in_features * self.bits // 8, dtype=torch.uint8)
        step = _tiles_per_block(self.in_features)
        for t in range(0, self.qdata.shape[0], step):
            q = _unpack_int4_vnni(self.qdata[t : t + step], self)  # [16 tiles, in]
            out[16 * t : 16 * t + q.shape[0]] = bitpack(q, self.bits)
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Reference weight ``[out, in]``: ``(q - off) * s + z`` computed in float32."""
        return _dequantize(self.unpacked(), self, torch.float32).to(dtype)

    def nbytes(self) -> int:
        """Bytes held by the quantized tensors (values, scales/zeros, bias)."""
        tensors = (self.qdata, self._scales_and_zeros, self.bias)
        return sum(t.nbytes for t in tensors if t is not None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, layout={self.layout}"
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> QuantLinear:
        # where (and as what) fn sends floating-point tensors
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.device))
        if probe.dtype != self.compute_dtype:
            raise TypeError(f"QuantLinear keeps compute_dtype {self.compute_dtype}")
        if probe.device != self.device:
            self._move(probe.device)
        return self

    def _move(self, device: torch.device) -> None:
        q, sz = self.unpacked().to(device), self.scales_and_zeros.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        self._pack(q, sz)

    def _pack(self, q: Tensor | Bitpacked, scales_and_zeros: Tensor) -> None:
        """Choose the layout for ``q``'s device and pack ``q`` (and for int4_vnni the scales)."""
        self.layout = _choose_layout(self, q.device)
        if self.layout == "int4_vnni":
            rows = q.rows if isinstance(q, Bitpacked) else lambda a, b: q[a:b]
            self.qdata = _pack_int4_vnni(rows, scales_and_zeros, self)
            self._scales_and_zeros = None
        else:
            if isinstance(q, Bitpacked):
                q = q.rows(0, self.out_features)
            self._scales_and_zeros = scales_and_zeros  # [in / g, out, 2]
            self.qdata = _PACK[self.layout](q, self)


def _choose_layout(m: QuantLinear, device: torch.device) -> str:
    on_cuda = device.type == "cuda"
    if _vnni_fits(m) and not on_cuda and native.int4_vnni() is not None:
        return "int4_vnni"
    if m.bits <= 4 and m.group_size in INT4_GROUP_SIZES and m.out_features % 16 == 0:
        if not on_cuda:
            return "int4_cpu"
        if int4_cuda_fits(m.in_features, m.compute_dtype):
            return "int4_cuda"
    if m.bits == 8 and m.group_size == m.in_features and not on_cuda:
        return "int8_rowwise"
    return "bitpack"


def _vnni_fits(m: QuantLinear) -> bool:
    """Whether the shapes and formats are the ones csrc/int4_vnni.c takes."""
    return (
        m.bits == 4 and m.compute_dtype == torch.bfloat16 and m.group_size % 64 == 0
        and m.in_features % 64 == 0 and m.out_features % 16 == 0
    )  # fmt: skip


def offset(bits: int) -> int:
    """The value stored for a zero weight offset: q - off is signed."""
    return 8 if bits <= 4 else 128


def _dequantize(q: Tensor, m: QuantLinear, dtype: torch.dtype, first_row: int = 0) -> Tensor:
    """``(q - off) * s + z`` in ``dtype``: rows ``q[r, in]`` of the weight from ``first_row``
    -> ``[r, in]``."""
    rows = q.shape[0]
    groups = q.view(rows, -1, m.group_size).to(dtype)  # [r, in / g, g]
    sz = m.scales_and_zeros[:, first_row : first_row + rows].transpose(0, 1).to(dtype)
    w = groups.sub_(offset(m.bits)).mul_(sz[..., :1]).add_(sz[..., 1:])  # sz: [r, in / g, 2]
    return w.view(rows, m.in_features)


# ---------------------------------------------------------------------------------------------
# Layouts: pack (q[out, in] uint8 -> qdata), unpack (qdata -> q), matmul (x[M, in] -> [M, out])


def bitpack(q: Tensor, bits: int) -> Tensor:
    """``q[n, k]`` -> ``[n, k * bits / 8]`` uint8: each 8 values form ``bits`` little-endian
    bytes, value ``i`` at bit ``bits * i`` (for 2 and 4 bits: whole values per byte)."""
    n, k = q.shape
    if bits == 8:
        return q.contiguous()
    if bits in (2, 4):
        per = 8 // bits
        values = q.view(n, k // per, per)  # [n, k / per, per]
        packed = values[..., 0].clone()
        for i in range(1, per):
            packed |= values[..., i] << (bits * i)
        return packed
    eights = q.view(n, k // 8, 8).to(torch.int32)  # [n, k / 8, 8]
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int32, device=q.device)
    word = (eights << shifts).sum(-1, dtype=torch.int32)  # [n, k / 8], bits * 8 <= 32 bits
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int32, device=q.device)
    packed = (word[..., None] >> byte_shifts) & 0xFF  # [n, k / 8, bits]
    return packed.to(torch.uint8).view(n, k * bits // 8)


def bitunpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of ``_bitpack``: ``[n, k * bits / 8]`` uint8 -> ``q[n, k]`` uint8."""
    n = packed.shape[0]
    if bits == 8:
        return packed
    if bits in (2, 4):
        mask = 2**bits - 1
        values = [packed >> (bits * i) & mask for i in range(8 // bits)]
        return torch.stack(values, -1).view(n, -1)  # [n, k / per, per] -> [n, k]
    nbytes = packed.view(n, -1, bits).to(torch.int32)  # [n, k / 8, bits]
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int32, device=packed.device)
    word = (nbytes << byte_shifts).sum(-1, dtype=torch.int32)  # [n, k / 8]
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int32, device=packed.device)
    q = (word[..., None] >> shifts) & (2**bits - 1)  # [n, k / 8, 8]
    return q.to(torch.uint8).view(n, -1)


def _torch_pack(q: Tensor) -> Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)  # [out, in / 2]


def _pack_int4_cpu(q: Tensor, m: QuantLinear) -> Tensor:
    return _squeeze(_torch_pack(q), m.bits)


def _unpack_int4_cpu(qdata: Tensor, m: QuantLinear) -> Tensor:
    packed = _expand(qdata, m.bits)  # [out, in / 2]
    block = _cpu_int4_block_n()
    if block is None:
        return _unpack_int4_with_kernel(packed, m, torch._weight_int4pack_mm_for_cpu)
    return _int4_cpu_layout_unpack(packed, block)


def _squeeze(packed: Tensor, bits: int) -> Tensor:
    """Int4pack bytes ``[out, in / 2]`` whose nibbles are ``< 2**bits`` -> ``[out, in * bits / 8]``.

    Byte-local on the kernel's bytes, so independent of its nibble order. Of the ``L`` bytes,
    byte ``j`` and ``j + L/2`` share one byte of the 2-bit plane (shifted by 0 and 2); for
    3 bits, bit 2 of each nibble goes to a 1-bit plane where quarter ``i`` is shifted by ``i``.
    Both are chosen so that ``_expand`` writes contiguous halves/quarters, not interleaved bytes.
    """
    if bits == 4:
        return packed
    flat = packed.view(-1)
    halves = (flat & 0x33).view(2, -1)  # [2, L / 2]
    planes = [halves[0] | halves[1] << 2]
    if bits == 3:
        quarters = (flat >> 2 & 0x11).view(4, -1)  # [4, L / 4]
        planes.append(quarters[0] | quarters[1] << 1 | quarters[2] << 2 | quarters[3] << 3)
    return torch.cat(planes).view(packed.shape[0], -1)


_TWO_BIT_MASK = 0x3333_3333_3333_3333  # bits 0, 1, 4, 5 of every byte
_BIT_TWO_MASK = 0x4444_4444_4444_4444  # bits 2, 6 of every byte


def _expand(qdata: Tensor, bits: int) -> Tensor:
    """Inverse of ``_squeeze``; runs on every forward, so it works on int64 words (every
    shift/mask pair is still byte-local) and writes into one buffer."""
    if bits == 4:
        return qdata
    flat = qdata.view(-1)
    n_two = flat.numel() * 2 // bits  # the 2-bit plane is 2/bits of the bytes
    two = flat[:n_two].view(torch.int64)  # [L / 16]
    out = torch.empty(2, two.numel(), dtype=torch.int64, device=qdata.device)  # L bytes
    torch.bitwise_and(two, _TWO_BIT_MASK, out=out[0])
    torch.bitwise_right_shift(two, 2, out=out[1]).bitwise_and_(_TWO_BIT_MASK)
    if bits == 3:
        one = flat[n_two:].view(torch.int64)  # [L / 32]
        bit = torch.empty_like(one)
        for i, quarter in enumerate(out.view(4, -1)):  # quarter i sits at shift i in `one`
            shift = torch.bitwise_left_shift if i <= 2 else torch.bitwise_right_shift
            quarter |= shift(one, abs(2 - i), out=bit).bitwise_and_(_BIT_TWO_MASK)
    return out.view(torch.uint8).view(qdata.shape[0], -1)


def _int4_cpu_layout_pack(q: Tensor, block: int) -> Tensor:
    """Our model of torch's CPU int4pack layout (checked against torch by ``_cpu_int4_block_n``):
    rows go in blocks of ``block``; within a full block the byte at ``[k, d]`` holds rows ``d``
    (low nibble) and ``d + block / 2`` (high) at column ``k``; a shorter tail block pairs
    adjacent rows ``2d``, ``2d + 1``."""
    n, k = q.shape
    full = n // block * block
    head = q[:full].view(n // block, 2, block // 2, k)  # [blocks, 2, block / 2, k]
    head = (head[:, 0] | head[:, 1] << 4).transpose(1, 2).reshape(full, k // 2)
    tail = q[full:].view(-1, 2, k)  # [tail / 2, 2, k]
    tail = (tail[:, 0] | tail[:, 1] << 4).T.reshape(n - full, k // 2)
    return torch.cat([head, tail]).to(torch.uint8)


def _int4_cpu_layout_unpack(packed: Tensor, block: int) -> Tensor:
    """Inverse of ``_int4_cpu_layout_pack``."""
    n, k = packed.shape[0], packed.shape[1] * 2
    full = n // block * block
    head = packed[:full].reshape(n // block, k, block // 2)  # [blocks, k, block / 2]
    head = torch.stack([head & 15, head >> 4], 1).transpose(2, 3).reshape(full, k)
    tail = packed[full:].reshape(k, -1).T  # [tail / 2, k]
    tail = torch.stack([tail & 15, tail >> 4], 1).reshape(n - full, k)
    return torch.cat([head, tail])


@functools.cache
def _cpu_int4_block_n() -> int | None:
    """Row block of this machine's CPU int4pack layout (it depends on the ISA), or None when
    the layout matches none we model."""
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randint(0, 16, (n, 64), generator=gen, dtype=torch.uint8) for n in (16, 208)]
    for block in (64, 32, 16):
        if all(torch.equal(_int4_cpu_layout_pack(q, block), _torch_pack(q)) for q in probes):
            return block
    log.warning("unknown CPU int4pack layout; unpacking through the kernel (slow)")
    return None


def _unpack_int4_with_kernel(packed: Tensor, m: QuantLinear, mm: Callable[..., Tensor]) -> Tensor:
    """Layout-independent unpack: multiply identity rows with scale 1 and zero 8 (exact)."""
    kw = {"dtype": m.compute_dtype, "device": packed.device}
    unit = torch.zeros(m.in_features // m.group_size, m.out_features, 2, **kw)  # [in / g, out, 2]
    unit[..., 0], unit[..., 1] = 1, 8
    cols = []
    for start in range(0, m.in_features, _UNPACK_EYE_ROWS):
        rows = min(_UNPACK_EYE_ROWS, m.in_features - start)
        eye = torch.zeros(rows, m.in_features, **kw)  # [rows, in], ones at (i, start + i)
        eye.diagonal(start).fill_(1)
        cols.append(mm(eye, packed, m.group_size, unit))  # [rows, out] = q[:, start:...].T
    return torch.cat(cols).T.round().to(torch.uint8).contiguous()


def _pack_int4_cuda(q: Tensor, m: QuantLinear) -> Tensor:
    inner_k_tiles = next(t for t in (8, 4, 2) if m.in_features % (t * 16) == 0)
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # [out, in / 2] uint8
    return torch._convert_weight_to_int4pack(pairs, inner_k_tiles)


def _unpack_int4_cuda(packed: Tensor, m: QuantLinear) -> Tensor:
    return _unpack_int4_with_kernel(packed, m, torch._weight_int4pack_mm)


def _matmul_int4_cpu(x: Tensor, m: QuantLinear) -> Tensor:
    packed = _expand(m.qdata, m.bits)  # [out, in / 2]
    return torch._weight_int4pack_mm_for_cpu(x, packed, m.group_size, m.scales_and_zeros)


def _pack_int4_vnni(
    rows: Callable[[int, int], Tensor], scales_and_zeros: Tensor, m: QuantLinear
) -> Tensor:
    """``q[out, in]`` (``rows(a, b)`` = ``q[a:b]``, taken a block at a time) and
    ``scales_and_zeros[in / g, out, 2]`` -> ``[out / 16, in / g, 8 g + 64]`` uint8
    (csrc/int4_vnni.c): per tile of 16 rows and group, the values, byte ``(c, r, j)``
    ``= q[16 t + r, 8 c + j] | q[16 t + r, 8 c + 4 + j] << 4``, then the 16 rows' (s, z)."""
    n, k, g = m.out_features, m.in_features, m.group_size
    out = torch.empty(n // 16, k // g, 8 * g + 64, dtype=torch.uint8)
    pairs = scales_and_zeros.view(k // g, n // 16, 16, 2).transpose(0, 1)  # [t, in / g, 16, 2]
    out[..., 8 * g :] = pairs.contiguous().view(torch.uint8).view(n // 16, k // g, 64)
    step = _tiles_per_block(k)
    for t in range(0, n // 16, step):
        chunk = rows(16 * t, 16 * (t + step))
        tiles = chunk.view(-1, 16, k // 8, 2, 4).permute(0, 2, 1, 3, 4)  # [t, c, r, half, j]
        values = tiles[:, :, :, 0] | tiles[:, :, :, 1] << 4  # [t, c, r, j]
        out[t : t + step, :, : 8 * g] = values.reshape(-1, k // g, 8 * g)
    return out


def _tiles_per_block(in_features: int) -> int:
    """Tiles of 16 rows converted at a time to or from the int4_vnni layout: temporaries stay
    around _PACK_CHUNK_BYTES whatever the weight's size."""
    return max(1, _PACK_CHUNK_BYTES // (16 * in_features))


def _unpack_int4_vnni(qdata: Tensor, m: QuantLinear) -> Tensor:
    """``qdata`` (all of m's tiles, or a slice of them) -> ``q[16 tiles, in]``."""
    n, k, g = 16 * qdata.shape[0], m.in_features, m.group_size
    tiles = qdata[..., : 8 * g].reshape(n // 16, k // 8, 16, 1, 4)  # [t, c, r, 1, j]
    halves = torch.cat([tiles & 15, tiles >> 4], dim=3)  # [t, c, r, half, j]
    return halves.permute(0, 2, 1, 3, 4).reshape(n, k)


def _vnni_scales(m: QuantLinear) -> Tensor:
    n, k, g = m.out_features, m.in_features, m.group_size
    pairs = m.qdata[..., 8 * g :].contiguous().view(m.compute_dtype)  # [t, in / g, 32]
    return pairs.view(n // 16, k // g, 16, 2).transpose(0, 1).reshape(k // g, n, 2)


def _matmul_int4_vnni(x: Tensor, m: QuantLinear) -> Tensor:
    """x [M, in] -> [M, out] in x's dtype, bias included."""
    if x.dtype in (torch.float32, torch.bfloat16):
        return native.int4_vnni_matmul(x, m.qdata, m.out_features, m.group_size, m.bias)
    return _matmul_int4_vnni(x.float(), m).to(x.dtype)


def _matmul_int4_cuda(x: Tensor, m: QuantLinear) -> Tensor:
    return torch._weight_int4pack_mm(x, m.qdata, m.group_size, m.scales_and_zeros)


def _matmul_int8_rowwise(x: Tensor, m: QuantLinear) -> Tensor:
    # W = (q - 128) * s + z per row  =>  x @ W.T = kernel(x, q - 128, s) + rowsum(x) * z
    scales, zeros = m.scales_and_zeros[0].unbind(-1)  # [out] each
    y = torch._weight_int8pack_mm(x, m.qdata, scales.contiguous())  # [M, out]
    return y + x.sum(-1, keepdim=True, dtype=torch.float32) * zeros.float()


def _matmul_bitpack(x: Tensor, m: QuantLinear) -> Tensor:
    """Dequantize and multiply in row blocks, so the temporaries stay under
    BITPACK_SCRATCH_ELEMENTS fp32 values whatever the weight's size (still a full pass of
    dequantization per call: the slow layout)."""
    rows = max(1, BITPACK_SCRATCH_ELEMENTS // m.in_features)
    parts = []
    for start in range(0, m.out_features, rows):
        q = bitunpack(m.qdata[start : start + rows], m.bits)  # [r, in]
        # float32 arithmetic then one rounding: (q - off) * s cancels against z in low precision
        w = _dequantize(q, m, torch.float32, start)
        parts.append(F.linear(x, w.to(m.compute_dtype)))  # [M, r]
    return torch.cat(parts, dim=-1)


_PACK = {  # int4_vnni: _pack calls _pack_int4_vnni (it packs the scales too)
    "int4_cpu": _pack_int4_cpu,
    "int4_cuda": _pack_int4_cuda,
    "int8_rowwise": lambda q, m: (q ^ 0x80).view(torch.int8),
    "bitpack": lambda q, m: bitpack(q, m.bits),
}
_UNPACK = {
    "int4_cpu": _unpack_int4_cpu,
    "int4_vnni": _unpack_int4_vnni,
    "int4_cuda": _unpack_int4_cuda,
    "int8_rowwise": lambda data, m: data.view(torch.uint8) ^ 0x80,
    "bitpack": lambda data, m: bitunpack(data, m.bits),
}
_MATMUL = {  # int4_vnni: forward calls _matmul_int4_vnni (it adds the bias)
    "int4_cpu": _matmul_int4_cpu,
    "int4_cuda": _matmul_int4_cuda,
    "int8_rowwise": _matmul_int8_rowwise,
    "bitpack": _matmul_bitpack,
}

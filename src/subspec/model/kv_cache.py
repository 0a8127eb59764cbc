"""A static key/value cache: allocated once, written by slot index, compacted after a tree."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for up to `capacity` slots.

    Slots [0, length) hold committed tokens; the cache alone changes `length`. A forward pass
    writes new tokens at slots >= length; `advance` commits those written in order, `accept`
    moves a speculative round's accepted slots into place and commits them, `trim` forgets.
    """

    def __init__(self, num_layers, num_kv_heads, head_dim, capacity, dtype, device):
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, Hkv, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, Hkv, S, D]
        self.capacity = capacity
        self._length = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def length(self) -> int:
        """Committed slots."""
        return self._length

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([Hkv, T, D]) of one layer at `slots` ([T])."""
        self.k[layer].index_copy_(1, slots, k)
        self.v[layer].index_copy_(1, slots, v)

    def view(self, layer: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first kv_len slots of one layer: two [Hkv, kv_len, D] views."""
        return self.k[layer, :, :kv_len], self.v[layer, :, :kv_len]

    def advance(self, n: int) -> None:
        """Commit the n slots after `length`, which a forward pass has written."""
        if not 0 <= self._length + n <= self.capacity:
            raise ValueError(f"cannot advance {n} slots from {self._length} of {self.capacity}")
        self._length += n

    def accept(self, src_slots: torch.Tensor) -> None:
        """Move slots `src_slots` ([n], increasing, all >= length) to length.. in every layer
        and commit them: the accepted nodes of a speculative round."""
        n = src_slots.numel()
        if n:
            dst = slice(self._length, self._length + n)
            self.k[:, :, dst] = self.k.index_select(2, src_slots)
            self.v[:, :, dst] = self.v.index_select(2, src_slots)
        self.advance(n)

    def move(self, src_slots: torch.Tensor, dst_start: int) -> None:
        """Copy uncommitted slots `src_slots` ([n], increasing) to dst_start.. (>= length) in
        every layer, without committing them: draft KV that moves with its tree."""
        n = src_slots.numel()
        if dst_start < self._length or dst_start + n > self.capacity:
            raise ValueError(f"cannot move {n} slots to {dst_start} (length {self._length})")
        dst = slice(dst_start, dst_start + n)
        self.k[:, :, dst] = self.k.index_select(2, src_slots)
        self.v[:, :, dst] = self.v.index_select(2, src_slots)

    def trim(self, length: int) -> None:
        """Forget everything from slot `length` on (0: an empty cache for a new request)."""
        self._length = min(self._length, max(length, 0))

"""The KV-cache slots a speculative round may write, handed out by one owner.

A round writes after the committed prefix: first its tree (drafted there, then verified
there), then, drafting ahead (lookahead.py), a copy of each guessed leaf and a next tree per
guess. The runtime sized the cache for spec.cache_slots such slots after the longest context
(RuntimeConfig.capacity); RoundSlots hands them out in order and refuses any range past them,
so that no node's KV lands on another's.
"""

from __future__ import annotations


class RoundSlots:
    """Slots [start, start + size) of the cache, handed out front to back."""

    def __init__(self, start: int, size: int, capacity: int):
        """`start`: the committed length; `size`: the round's slots (spec.cache_slots);
        `capacity`: the cache's."""
        if start < 0 or start + size > capacity:
            raise ValueError(f"a round of {size} slots from {start} overruns a cache of {capacity}")
        self.start, self.end, self.next = start, start + size, start

    @property
    def free(self) -> int:
        """Slots not handed out yet."""
        return self.end - self.next

    def take(self, n: int) -> int:
        """The first of the next `n` slots, now handed out; refused past the round's slots."""
        if not 0 <= n <= self.free:
            raise ValueError(f"cannot take {n} slots: {self.free} of the round's are left")
        first, self.next = self.next, self.next + n
        return first

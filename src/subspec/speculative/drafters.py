"""The drafts that propose token trees: SubSpec's shared-layer draft and a classic small model.

Both implement `Drafter`: `prefill` the prompt, `step` one tree level, `commit` a round's
accepted nodes. The speculative loop (decoding.py) needs nothing else from them.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Protocol

import torch

from subspec.model.forward import finish
from subspec.model.layers import LayerSource, Linear
from subspec.model.placed import PlacedModel
from subspec.speculative.decoding import prefill


class Drafter(Protocol):
    def prefill(self, prompt: list[int], chunk: int) -> None:
        """Bring the draft's cache to the prompt (the target's prefill has run)."""

    def step(self, tokens, positions, slots, mask, kv_len) -> torch.Tensor:
        """Draft logits [t, V] for one tree level (see tree.DraftStep)."""

    def step_parts(self, tokens, positions, slots, mask, kv_len) -> Generator:
        """step() a part (a decoder layer or less) per next(); returns the logits."""

    def commit(self, src_slots: torch.Tensor) -> None:
        """The round's root and the accepted nodes, whose draft KV is at `src_slots` ([n],
        increasing, after the committed prefix), are now committed."""

    def relocate(self, src_slots: torch.Tensor, dst_start: int) -> None:
        """Draft KV at `src_slots` ([n], increasing) moves to dst_start.. (uncommitted): a
        tree drafted ahead, or the nodes a pruned tree keeps."""


class _StepInParts:
    """step() as step_parts() run to its end."""

    def step(self, tokens, positions, slots, mask, kv_len) -> torch.Tensor:
        return finish(self.step_parts(tokens, positions, slots, mask, kv_len))


class SharedDrafter(_StepInParts):
    """SubSpec's draft: the target's model and cache, substitutes in place of streamed layers."""

    def __init__(self, target: PlacedModel, layers: LayerSource, lm_head: Linear | None = None):
        self.target, self.layers = target, layers
        self.lm_head = lm_head  # a low-bit substitute, or None to share the target's

    def prefill(self, prompt: list[int], chunk: int) -> None:
        """Nothing to do: the draft reads the prefix KV the target wrote."""

    def step_parts(self, tokens, positions, slots, mask, kv_len) -> Generator:
        t = self.target
        hidden = yield from t.model.forward_parts(
            self.layers, t.cache, tokens, positions, slots, mask, kv_len
        )
        return t.logits(hidden, self.lm_head)

    def commit(self, src_slots: torch.Tensor) -> None:
        """Nothing to do: the shared cache accepted the target's slots."""

    def relocate(self, src_slots: torch.Tensor, dst_start: int) -> None:
        self.target.cache.move(src_slots, dst_start)


class ModelDrafter(_StepInParts):
    """Classic speculation's draft: a separate, smaller model with its own cache."""

    def __init__(self, draft: PlacedModel):
        self.draft = draft

    def prefill(self, prompt: list[int], chunk: int) -> None:
        self.draft.cache.trim(0)
        prefill(self.draft, prompt, chunk)

    def step_parts(self, tokens, positions, slots, mask, kv_len) -> Generator:
        d = self.draft
        hidden = yield from d.model.forward_parts(
            d.layers, d.cache, tokens, positions, slots, mask, kv_len
        )
        return d.logits(hidden)

    def commit(self, src_slots: torch.Tensor) -> None:
        self.draft.cache.advance(1)  # the root, drafted at the first slot
        self.draft.cache.accept(src_slots[1:])

    def relocate(self, src_slots: torch.Tensor, dst_start: int) -> None:
        self.draft.cache.move(src_slots, dst_start)

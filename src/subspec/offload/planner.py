"""The memory planner: model sizes and a budget in, a placement out. Pure, no I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from subspec.config import format_size
from subspec.errors import SubspecError


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each part of a model in fast memory, at the compute dtype."""

    num_layers: int
    layer_bytes: int  # one decoder layer, full precision
    substitute_bytes: int  # one decoder layer's low-bit substitute (0: no substitutes)
    embed_bytes: int
    lm_head_bytes: int  # 0 when tied to the embeddings
    norm_bytes: int  # final norm
    kv_bytes: int  # the KV cache for the whole context
    extra_bytes: int = 0  # anything else that must be resident (e.g. a classic draft model)
    process_bytes: int = 0  # the process before any weight: interpreter, torch, tokenizer
    draft_head_bytes: int = 0  # the draft's low-bit LM head, needed only when layers stream
    scratch_bytes: int = 0  # working buffers of the matmul kernels (layers.widened_linear)
    head_can_stream: bool = True  # False when a draft shares the target's LM head
    workspace_bytes: int = 0  # activations, attention scores, logits, device context (CUDA)
    # streaming in residual form (kernels/residual.py): one staging buffer's bytes (0: a
    # layer's, layer_bytes) and the buffer a streamed weight is rebuilt in before its matmul
    staging_bytes: int = 0
    rebuild_bytes: int = 0
    # the draft runs substitutes of the resident layers too, in place of the layers (a draft
    # step on a CPU is bound by the bytes it reads: a bf16 layer is ~3.6 of its substitute)
    substitutes_everywhere: bool = False

    @property
    def buffer_bytes(self) -> int:
        """One staging buffer: a streamed layer as the slow tier holds it."""
        return self.staging_bytes or self.layer_bytes


@dataclass
class Placement:
    """What lives in fast memory and what streams from the slow tier on every pass."""

    budget_bytes: int | None
    resident_layers: list[int]
    streamed_layers: list[int]
    embed_resident: bool
    n_buffers: int
    buffer_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)  # part -> bytes in fast memory
    lm_head_resident: bool = True  # False: the LM head streams too, in vocabulary chunks
    residual_stream: bool = False  # the layers stream in residual form (kernels/residual.py)
    substitutes_everywhere: bool = False  # every layer has a substitute, the resident ones too

    @property
    def resident_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def streams(self) -> bool:
        return bool(self.streamed_layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resident_bytes"] = self.resident_bytes
        return d

    def summary(self) -> str:
        """A few human-readable lines for --verbose."""
        n = len(self.resident_layers) + len(self.streamed_layers)
        head = "" if self.lm_head_resident else " + the LM head"
        form = " in residual form" if self.residual_stream else ""
        lines = [
            f"placement: {len(self.resident_layers)}/{n} decoder layers resident, "
            f"{len(self.streamed_layers)}{head} streamed{form} through {self.n_buffers} "
            f"buffers of {format_size(self.buffer_bytes)}",
            "  fast memory: "
            + ", ".join(f"{k} {format_size(v)}" for k, v in self.breakdown.items() if v),
        ]
        total = f"  total {format_size(self.resident_bytes)}"
        if self.budget_bytes is not None:
            left = self.budget_bytes - self.resident_bytes
            total += f" of budget {format_size(self.budget_bytes)} ({format_size(left)} left)"
        lines.append(total)
        return "\n".join(lines)


def plan(sizes: ModelSizes, budget: int | None, n_buffers: int = 2) -> Placement:
    """Place layers: as many resident as the budget allows, the rest streamed.

    When the model streams, embedding rows are read from the checkpoint on demand (unless the
    embeddings are the tied LM head, which is resident anyway): a resident layer saves a
    transfer on every pass, a resident embedding table saves almost nothing. Only when no
    layer fits beside it does the LM head stream too (then as many layers as fit in its place
    stay resident), in chunks no larger than a staging buffer, through the same buffers: that
    sets the minimum budget.
    """
    everything = _breakdown(sizes, sizes.num_layers, 0, True, True)
    if budget is None or sum(everything.values()) <= budget:
        return Placement(budget, list(range(sizes.num_layers)), [], True, 0, 0, everything)
    layers = list(range(sizes.num_layers))
    tied = sizes.lm_head_bytes == 0
    heads = (True, False) if sizes.head_can_stream else (True,)
    options = [(r, head) for head in heads for r in range(sizes.num_layers - 1, -1, -1)]
    for resident, head in options:
        parts = _breakdown(sizes, resident, n_buffers, tied and head, head)
        if sum(parts.values()) <= budget:
            return Placement(
                budget, layers[:resident], layers[resident:], tied and head, n_buffers,
                sizes.buffer_bytes, parts, lm_head_resident=head,
                residual_stream=bool(sizes.staging_bytes),
                substitutes_everywhere=sizes.substitutes_everywhere,
            )  # fmt: skip
    parts = minimum_parts(sizes, n_buffers)
    minimum = sum(parts.values())
    raise SubspecError(
        f"memory budget {format_size(budget)} is below this model's minimum of "
        f"{format_size(minimum)} ({minimum} bytes) with these settings; the biggest parts: "
        f"{biggest(parts)}"
    )


def minimum_parts(sizes: ModelSizes, n_buffers: int = 2) -> dict[str, int]:
    """The fast-memory parts at the smallest budget that any placement of `sizes` fits."""
    head = not sizes.head_can_stream  # the LM head stays resident only when it must
    return _breakdown(sizes, 0, n_buffers, sizes.lm_head_bytes == 0 and head, head)


def biggest(parts: dict[str, int], n: int = 3) -> str:
    """The `n` largest parts, e.g. 'kv_cache 1.20 GB, lm_head 466.88 MB, ...'."""
    top = sorted(((v, k) for k, v in parts.items() if v), reverse=True)[:n]
    return ", ".join(f"{k} {format_size(v)}" for v, k in top)


def _breakdown(
    sizes: ModelSizes, resident: int, n_buffers: int, embed: bool, head: bool
) -> dict[str, int]:
    streamed = sizes.num_layers - resident
    substituted = sizes.num_layers if sizes.substitutes_everywhere and streamed else streamed
    return {
        "resident_layers": resident * sizes.layer_bytes,
        "substitutes": substituted * sizes.substitute_bytes,
        "draft_lm_head": sizes.draft_head_bytes if streamed else 0,
        "staging_buffers": n_buffers * sizes.buffer_bytes if streamed else 0,
        "rebuild_buffer": sizes.rebuild_bytes if streamed else 0,
        "embeddings": sizes.embed_bytes if embed and sizes.lm_head_bytes else 0,
        "lm_head": (sizes.lm_head_bytes or sizes.embed_bytes) if head else 0,
        "norms": sizes.norm_bytes,
        "kv_cache": sizes.kv_bytes,
        "extra": sizes.extra_bytes,
        "matmul_scratch": sizes.scratch_bytes,
        "workspace": sizes.workspace_bytes,
        "process": sizes.process_bytes,
    }

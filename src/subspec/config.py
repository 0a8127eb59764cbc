"""Settings that users choose: what to run, under which budget, how to sample and draft.

Every default and every list of choices the CLI, server and bench share lives here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from subspec.errors import SubspecError

if TYPE_CHECKING:
    import torch

DTYPES = ("bfloat16", "float32")  # the dtypes a runtime computes in, by name (torch_dtype)
METHODS = ("vanilla", "subspec", "classic")  # decoding methods of the runtime
DEFAULT_MODEL = "smollm2-135m-instruct"
NUMERICS = ("exact", "fast")
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature == 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SubspecError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SubspecError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SubspecError(f"top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


AUTO_WIDTH_NODES = 2  # under width auto, trees hold at most as many nodes as at this width


@dataclass(frozen=True)
class SpecConfig:
    """Tree drafting settings (see DESIGN.md: D, k, T_d)."""

    # CPU defaults, chosen by measurement (README): the paper's GPU shape is D=48, k=6
    depth: int | None = None  # None: chosen every round from measured costs (speculative/shape.py)
    # None: chosen with the depth. Fixed at 2 by default: on the 1.5B at 1.78 GB, width auto
    # ran at 4.58 tok/s against 4.93 for width 2 in the latest bench run (BENCHMARKS.md)
    width: int | None = 2
    # the width of a request that samples (temperature > 0), where `width` is fixed. Since
    # the draft proposes the target's coming samples (speculative/proposals.py) a sampled
    # tree holds them about as often as a greedy tree holds the argmax, and a third child
    # still holds them more often: on the 1.5B at 1.78 GB at T 0.7, tau 10.33 against 8.96
    # and 6.22 against 5.94 tok/s for width 2 in one bench run, for ~7 MB more cache and
    # working memory in the plan (BENCHMARKS.md)
    sampling_width: int = 3
    max_depth: int = 32  # the deepest tree depth=None may choose (it sizes the KV cache)
    max_width: int = 4  # the widest tree width=None may choose
    draft_temperature: float = 0.2
    verify_nodes: int = 0  # verify only the best-scoring nodes of the drafted tree (0 = all)
    bits: int = 4  # 16: full-precision copies (a draft identical to the target, for tests)
    group_size: int = 64
    head_bits: int = 4  # the draft's LM head: a low-bit substitute, or 16 to share the target's
    hqq_optimize: bool = (
        True  # HQQ's half-quadratic solver; False = plain min-max rounding, ~20x faster
    )
    overlap: bool = True  # draft the next tree while the verification pass waits for weights
    guesses: int = 2  # with overlap: outcomes of a round the next tree is drafted ahead on
    # stream a layer as its difference from the resident substitute (kernels/residual.py)
    residual_stream: bool = True

    def __post_init__(self) -> None:
        shape = (self.depth, self.width, self.max_depth, self.max_width, self.sampling_width)
        if any(v is not None and v < 1 for v in shape):
            raise SubspecError(f"depth and width must be >= 1, got {self.depth}, {self.width}")
        if self.guesses < 1:
            raise SubspecError(f"guesses must be >= 1, got {self.guesses}")
        if self.verify_nodes < 0:
            raise SubspecError(f"verify nodes must be >= 0, got {self.verify_nodes}")
        if not self.draft_temperature > 0:
            raise SubspecError(f"draft temperature must be > 0, got {self.draft_temperature}")
        if self.bits not in (2, 3, 4, 8, 16):
            raise SubspecError(f"bits must be one of 2, 3, 4, 8, 16, got {self.bits}")
        if self.head_bits not in (4, 8, 16):
            raise SubspecError(f"draft head bits must be 4, 8 or 16, got {self.head_bits}")

    @property
    def tree_size(self) -> int:
        """Nodes of the largest tree a round may draft."""
        # width auto keeps width 2's node count: wider trees are shallower (speculative/shape.py)
        width = max(self.width, self.sampling_width) if self.width else AUTO_WIDTH_NODES
        return 1 + (self.depth or self.max_depth) * width

    def for_request(self, sampling: SamplingConfig) -> SpecConfig:
        """The settings a request runs with: sampling_width for a sampled one (where the width
        is fixed); the tree room (tree_size) stays what the runtime was planned for."""
        if sampling.greedy or self.width is None or self.width == self.sampling_width:
            return self
        return replace(self, width=self.sampling_width, sampling_width=self.width)

    @property
    def draws_ahead(self) -> int:
        """The future draws whose noise a sampled request reads ahead (speculative/proposals.py):
        its tree's, to the bonus after the deepest node, and the next tree's root guessed after
        it; deeper levels of a tree drafted ahead propose without it."""
        return (self.depth or self.max_depth) + 2

    @property
    def cache_slots(self) -> int:
        """KV slots a round needs after the committed prefix: its tree and, with overlap, for
        each guess a copy of its leaf and the next tree drafted ahead on it
        (speculative/lookahead.py).
        Under depth auto the guesses share one largest tree's room (trees are mostly
        shallower than max_depth), so the cache does not grow with them."""
        if not self.overlap:
            return self.tree_size
        if self.depth is None:
            return 2 * self.tree_size + 1
        return self.tree_size + self.guesses * (self.tree_size + 1)


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9,
}  # fmt: skip


def parse_size(text: str) -> int:
    """Parse a byte size such as '1.2GB', '900MiB' or '123456' into bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and _SIZE_UNITS.get(m.group(2).lower())
    if not m or unit is None:
        raise SubspecError(f"cannot parse size {text!r}; use e.g. 1.2GB, 900MiB or a byte count")
    return int(float(m.group(1)) * unit)


def format_size(n: float) -> str:
    """Human-readable bytes, e.g. 1.23 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class RuntimeConfig:
    """What to load and under which budget."""

    model: str = DEFAULT_MODEL
    dtype: str = "bfloat16"
    device: str = "cpu"
    memory_budget: int | None = None  # bytes of fast memory; None = no limit
    context: int | None = DEFAULT_CONTEXT  # committed tokens the KV cache holds (prompt +
    # output); None: DEFAULT_CONTEXT or the model's max_position_embeddings when smaller
    methods: tuple[str, ...] = ("vanilla",)  # which drafts to prepare
    spec: SpecConfig = field(default_factory=SpecConfig)
    draft_model: str | None = None  # classic speculation's draft
    prefill_chunk: int = 512
    n_buffers: int = 2
    # keep the KV of the last request's longest prefix in common with the next prompt
    prefix_cache: bool = True
    map_embeddings: bool = False  # read embedding rows from the checkpoint even when all fits
    # "exact": the target's linears and attention give each row the same bits whatever the
    # batch (a tree, a prefill chunk or one token), so bf16 speculation equals vanilla; "fast":
    # torch's kernels. None: exact on CPU, fast on CUDA (the exact kernels are CPU code).
    numerics: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SubspecError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise SubspecError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if "classic" in self.methods and not self.draft_model:
            raise SubspecError("method classic needs --draft-model")
        if self.context is not None and self.context < 16:
            raise SubspecError(f"context must be >= 16 tokens, got {self.context}")
        if self.numerics not in (None, *NUMERICS):
            raise SubspecError(
                f"numerics must be one of {', '.join(NUMERICS)}, got {self.numerics!r}"
            )
        if self.device.startswith("cuda") and not _cuda_available():
            raise SubspecError(f"device {self.device} requested but CUDA is not available")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def exact(self) -> bool:
        """Whether the target runs the row-invariant kernels (see `numerics`)."""
        return (self.numerics or ("fast" if self.device.startswith("cuda") else "exact")) == "exact"

    @property
    def capacity(self) -> int:
        """KV cache slots: the context plus a round's speculative slots."""
        return self.context + self.spec.cache_slots


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name` (one of DTYPES); torch is imported only here."""
    import torch

    return getattr(torch, name)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def methods_to_load(method: str | None) -> tuple[str, ...]:
    """The drafts to prepare for a requested method (None: let `default_method` choose)."""
    return ("vanilla", "subspec") if method is None else tuple(dict.fromkeys(("vanilla", method)))


def default_method(loaded: tuple[str, ...], streams: bool) -> str:
    """The method to run when none is named: the prepared draft, but vanilla when nothing
    streams and that draft is SubSpec's (its substitutes exist only for streamed layers)."""
    drafts = [m for m in loaded if m != "vanilla"]
    if not drafts or (drafts[0] == "subspec" and not streams):
        return "vanilla"
    return drafts[0]

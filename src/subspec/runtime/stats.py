"""The statistics of one generation: one typed record, built in one place (Session.stats)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MemoryStats:
    """What the runtime holds and streamed for a request."""

    bytes_streamed: int
    transfer_wait_s: float
    read_bytes: int  # slow-tier reads the prefetcher made, and the time they took
    read_s: float
    memory_budget_bytes: int | None
    resident_bytes: int
    rss_before_load_bytes: int  # fixed overhead: torch, tokenizer, ... before any weights
    load_peak_rss_bytes: int  # the process's peak through loading and preparing the weights
    placement: dict


@dataclass(frozen=True)
class SpecStats:
    """Speculative decoding's figures (absent for vanilla)."""

    tau: float  # tokens emitted per target forward in the decode phase, bonus included
    draft_s: float  # drafting that held up rounds
    verify_s: float  # verification passes, without the drafting done in their waits
    overlap_s: float  # drafting done while verification passes waited for weights
    draft_steps: int  # draft forwards in all (in the open and drafted ahead)
    lookahead_hits: int  # rounds whose tree had been drafted ahead
    depth: float  # tree shape: the mean depth of the rounds (chosen each round with auto)
    width: float  # likewise, the mean width
    depths: list[int]  # each round's tree depth
    widths: list[int]  # each round's tree width
    accept_lengths: list[int]  # accepted draft tokens per round
    rounds: list[list[float]]  # each round's [draft, verify, overlap] seconds
    ahead_steps: int = 0  # of draft_steps, those drafted ahead (each for all guesses at once)


@dataclass(frozen=True)
class GenerationStats:
    """Timings are decode phase unless named otherwise; the first token comes from prefill."""

    method: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    decode_tokens_per_s: float
    target_forwards: int  # decode phase
    peak_rss_bytes: int
    memory: MemoryStats
    spec: SpecStats | None = None
    device_peak_bytes: int | None = None  # CUDA: torch.cuda.max_memory_allocated
    cached_prompt_tokens: int = 0  # prompt tokens whose KV the last request left (not prefilled)
    top2_margins: list[float] | None = None  # vanilla greedy: the top-2 logit gap per token

    @property
    def decode_tokens(self) -> int:
        return max(self.new_tokens - 1, 0)

    def to_dict(self) -> dict:
        """The flat JSON record of `generate --json`, the server's `subspec` field and bench."""
        d = {k: v for k, v in asdict(self).items() if k not in ("memory", "spec")}
        d.update(asdict(self.memory))
        if self.spec is not None:
            d.update(asdict(self.spec))
        if self.top2_margins is None:
            del d["top2_margins"]
        return d

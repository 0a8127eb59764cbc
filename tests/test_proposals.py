"""What the draft proposes at a node: with the request's dice read ahead, the very token the
target will sample wherever the draft agrees with it."""

import pytest
import torch

from subspec.config import SamplingConfig
from subspec.speculative.proposals import Coupled, Dice, Ranked
from subspec.speculative.sampling import choose

VOCAB = 1000


def _rows(n: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize(
    "sampling, scale",
    [(SamplingConfig(temperature=0.7, top_p=0.9, top_k=50, seed=3), 3.0),
     (SamplingConfig(temperature=1.0, top_p=0.95, seed=4), 6.0)],  # a nucleus of < 64 tokens
)  # fmt: skip
def test_coupled_proposes_the_token_the_target_samples(sampling, scale):
    """Draft logits equal to the target's: the best coupled child is the token that
    torch.multinomial then draws, draw after draw, including draws nobody asked about."""
    gen = torch.Generator().manual_seed(sampling.seed)
    dice = Dice(gen, VOCAB, "cpu", 4)
    held = 0
    for t, logits in enumerate(_rows(150, scale=scale)):
        propose = Coupled(dice, sampling, 0.2, dice.first)
        logp, children = propose(logits[None], torch.zeros(1, dtype=torch.long), 3)
        assert logp.shape == children.shape == (1, 3)
        assert bool((logp[0, :-1] >= logp[0, 1:]).all()) and bool((logp <= 0).all())
        token = choose(logits, sampling, gen)
        if t % 3 == 2:  # this draw is taken without looking at it first
            dice.advance(1)
            continue
        held += int(children[0, 0]) == token
        dice.advance(1)
    assert held == 100


def test_coupled_reads_each_node_at_its_own_draw():
    """A node at depth d of a tree rooted at draw f is proposed from draw f + d: the same
    children as a tree rooted d draws later proposes at its root."""
    sampling = SamplingConfig(temperature=1.0, seed=1)
    dice = Dice(torch.Generator().manual_seed(1), VOCAB, "cpu", 4)
    logits = _rows(4, seed=1)
    depths = torch.arange(4)
    _, deep = Coupled(dice, sampling, 0.2, 0)(logits, depths, 2)
    for d in range(4):
        _, later = Coupled(dice, sampling, 0.2, 0).after(d)(logits[d : d + 1], depths[:1], 2)
        assert torch.equal(later[0], deep[d])
    dice.advance(2)
    _, again = Coupled(dice, sampling, 0.2, 2)(logits[2:], depths[:2], 2)
    assert torch.equal(again, torch.stack([deep[2], deep[3]]))
    # a draw past the 4 read ahead has no noise: the draft's best tokens
    _, past = Coupled(dice, sampling, 0.2, 2)(logits, torch.full((4,), 4), 2)
    assert torch.equal(past, logits.topk(2).indices)
    assert len(dice.rows) == 4


def test_ranked_children_are_the_draft_s_best_tokens():
    logits = _rows(2)
    logp, children = Ranked(0.5)(logits, torch.zeros(2, dtype=torch.long), 3)
    assert torch.equal(children, logits.topk(3).indices)
    want = torch.log_softmax(logits / 0.5, -1).gather(-1, children)
    torch.testing.assert_close(logp, want)


def test_dice_read_ahead_in_waits_gives_the_rows_drawn_on_demand():
    early, late = (Dice(torch.Generator().manual_seed(4), VOCAB, "cpu", 3) for _ in range(2))
    assert [early.read_ahead() for _ in range(4)] == [True, True, True, False]
    late.advance(1)
    early.advance(1)
    assert early.read_ahead() and not early.read_ahead()
    assert torch.equal(early.gumbel([1, 2, 3]), late.gumbel([1, 2, 3]))


def test_top_k_below_the_children_asked_for_pads_them_as_never_accepted():
    sampling = SamplingConfig(temperature=0.8, top_k=2, seed=0)
    dice = Dice(torch.Generator().manual_seed(0), VOCAB, "cpu", 4)
    logits = _rows(2)
    logp, children = Coupled(dice, sampling, 0.2, 0)(logits, torch.zeros(2, dtype=torch.long), 3)
    assert logp.shape == children.shape == (2, 3)
    assert bool(torch.isfinite(logp[:, :2]).all()) and bool(torch.isinf(logp[:, 2]).all())
    assert set(children[:, :2].flatten().tolist()) <= set(logits.topk(2).indices.flatten().tolist())

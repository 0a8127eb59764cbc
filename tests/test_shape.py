"""The tree's shape and drafting ahead, on tiny fakes: the chooser's depth and width follow
acceptance and costs, and the next tree is drafted in the pass's waits, a part at a time."""

import pytest
import torch

from subspec.config import SpecConfig


def _rounds(chooser, accepted, rounds=4, depth=16, width=2, step_s=0.1, verify_s=2.0, wait_s=1.0):
    """Feed `rounds` rounds of one shape, each with these accepted lengths by width."""
    for _ in range(rounds):
        chooser.observe_steps(width, depth * step_s, depth)
        chooser.observe_round(depth, list(accepted), 1 + depth * width, verify_s, wait_s)


def test_shape_chooser_depth_follows_acceptance_and_costs():
    from subspec.speculative.shape import DEEPEN_BY, START_DEPTH, ShapeChooser

    assert ShapeChooser(SpecConfig(depth=7, width=2)).shape().depth == 7
    chooser = ShapeChooser(SpecConfig(max_depth=32, width=2))
    assert chooser.shape().depth == START_DEPTH  # nothing measured yet
    _rounds(chooser, [16, 16])  # every round accepts its whole tree: deeper pays
    deep = chooser.shape().depth
    assert 16 < deep <= 16 + DEEPEN_BY  # deeper, but not far past what was seen
    poor = ShapeChooser(SpecConfig(max_depth=32, width=2))
    for accepted in (0, 1, 0, 2):  # the draft is rarely right: shallow trees pay
        _rounds(poor, [accepted, accepted], rounds=1)
    assert poor.shape().depth < 4
    slow = ShapeChooser(SpecConfig(max_depth=32, width=2))
    _rounds(slow, [16, 16], step_s=1.0)  # the same acceptance, draft steps 10x dearer
    assert slow.shape().depth < deep


def test_shape_chooser_counts_the_whole_pass():
    """A pass that drafts ahead in its waits lasts as long as one that idles in them: the
    chooser weighs depth against the pass's wall time, so a longer pass (the same target
    compute) buys deeper trees."""
    from subspec.speculative.shape import ShapeChooser

    depths = {}
    for pass_s in (0.6, 2.0):
        chooser = ShapeChooser(SpecConfig(max_depth=32, width=2))
        for accepted in (16, 6, 11, 3, 16, 9):  # acceptance falls off gradually with depth
            chooser.observe_steps(2, 16 * 0.05, 16)
            chooser.observe_round(16, [accepted, accepted], 33, pass_s, pass_s - 0.4)
        depths[pass_s] = chooser.shape().depth
    assert depths[2.0] > depths[0.6], depths


def test_shape_chooser_width_follows_acceptance_and_costs():
    from subspec.speculative.shape import EXPLORE_EVERY, ShapeChooser

    wide_pays = ShapeChooser(SpecConfig(width=None, max_width=4))
    _rounds(wide_pays, [1, 3, 12, 16], rounds=3, width=4)  # wider trees accept far more
    assert wide_pays.shape().width >= 3
    narrow_pays = ShapeChooser(SpecConfig(width=None, max_width=4))
    # width buys nothing, and the pass's compute (not hidden: no waiting) grows with the tree
    _rounds(narrow_pays, [8, 8, 8, 8], rounds=3, width=4, verify_s=2.0, wait_s=0.0)
    assert narrow_pays.shape().width == 1
    assert ShapeChooser(SpecConfig(width=3)).shape().width == 3
    # under width auto the widest tree runs now and then, to keep measuring every width
    explore = ShapeChooser(SpecConfig(width=None, max_width=4))
    _rounds(explore, [8, 8], rounds=EXPLORE_EVERY + 2, width=2, wait_s=0.0)
    assert explore.shape().width == 4


def test_accepted_by_width_reads_ranks_per_level():
    from subspec.speculative.shape import accepted_by_width

    # width 3: level 1 holds nodes 1-3, level 2 nodes 4-6, level 3 nodes 7-9 (best first)
    path = torch.tensor([1, 5, 9])  # ranks 0, 1, 2
    assert accepted_by_width(path, 3) == [1, 2, 3]
    assert accepted_by_width(torch.tensor([2, 4]), 3) == [0, 2, 2]
    assert accepted_by_width(torch.tensor([], dtype=torch.long), 2) == [0, 0]


class _NextTokenDrafter:
    """A draft whose next token is (token + 1) % VOCAB, drafted in LAYERS parts."""

    VOCAB, LAYERS = 11, 3

    def __init__(self):
        self.rows = []  # the rows of each draft step

    def step(self, tokens, positions, slots, mask, kv_len):
        self.rows.append(tokens.numel())
        return torch.nn.functional.one_hot((tokens + 1) % self.VOCAB, self.VOCAB).float() * 5

    def step_parts(self, *args):
        for _ in range(self.LAYERS):
            yield
        return self.step(*args)

    def relocate(self, src_slots, dst_start):
        pass


def _lookahead(spec):
    """A Lookahead after a depth-3, width-2 tree rooted at token 3 in slot 4."""
    from subspec.speculative.lookahead import Lookahead
    from subspec.speculative.proposals import Ranked
    from subspec.speculative.shape import Shape
    from subspec.speculative.slots import RoundSlots
    from subspec.speculative.tree import build_tree

    drafter = _NextTokenDrafter()
    drafted = build_tree(3, 4, 3, 2, 0.2, drafter.step, "cpu")
    drafter.rows.clear()
    slots = RoundSlots(4, spec.cache_slots, 4 + spec.cache_slots)
    slots.take(drafted.size)
    return Lookahead(drafted, slots, spec, Shape(3, 2), Ranked(0.2), drafter, "cpu")


def test_lookahead_drafts_in_parts_and_only_in_waits_it_can_fill():
    """The next tree is drafted a part (a layer of a draft step) per work() call, a level
    running on across calls; once parts were timed, a wait expected to be shorter than
    MIN_FILL of one gets nothing (work() says so) and leaves the level where it was. A fixed
    depth stays fixed."""
    from subspec.config import SpecConfig
    from subspec.speculative.lookahead import MIN_FILL

    layers, vocab = _NextTokenDrafter.LAYERS, _NextTokenDrafter.VOCAB
    ahead = _lookahead(SpecConfig(depth=3, guesses=1))
    for _ in range(layers):  # the guess's step, until its last part
        assert ahead.work() and ahead.steps == 0 and not ahead.builders
    assert ahead.work() and ahead.steps == 1 and ahead.guesses == [(3 + 3 + 1) % vocab]
    part_s = ahead.work_s / ahead.parts
    assert not ahead.work(MIN_FILL * part_s * 0.5) and ahead.parts == layers + 1
    assert ahead.work(MIN_FILL * part_s * 2) and ahead.parts == layers + 2
    while ahead.work():
        pass
    (builder,) = ahead.builders
    assert builder.done and ahead.steps == 1 + 3 and ahead.parts == 4 * (layers + 1)
    tree = builder.tree()
    assert tree.tokens[1].item() == (ahead.guesses[0] + 1) % vocab and tree.size == 1 + 3 * 2


def test_lookahead_deepens_a_complete_tree_in_waits_left_when_the_depth_is_chosen():
    """With the depth chosen per round, a tree drafted ahead to its shape's depth grows on in
    the waits left, up to the KV cache's room; a deepened level unfinished at take() is
    dropped, not left for the next round to draft in the open."""
    from subspec.config import SpecConfig

    layers, spec = _NextTokenDrafter.LAYERS, SpecConfig(max_depth=5, guesses=1)
    ahead = _lookahead(spec)
    while ahead.work():
        pass
    (builder,) = ahead.builders
    assert builder.depth == 5 and builder.done and ahead.steps == 1 + 5
    assert builder.tree().size == 1 + 5 * 2

    ahead = _lookahead(spec)
    while ahead.steps < 1 + 3:
        ahead.work()
    (builder,) = ahead.builders
    assert ahead.work() and builder.depth == 3 and builder.level == 3
    taken = ahead.take(ahead.paths[0][1:].tolist(), ahead.guesses[0])
    assert taken is builder and taken.done and taken.depth == 3
    assert ahead.parts == (1 + 3) * (layers + 1) + 1


def test_lookahead_drafts_on_two_guesses_in_one_step_per_level():
    """The next trees grow on the two best full-depth paths at once: one draft step per
    level holds both frontiers, and take() keeps the tree of whichever guess came true (its
    path and its bonus), none otherwise. Where the KV cache holds two trees only at the
    chosen depth, they do not deepen; where it cannot hold two, one guess is drafted."""
    from subspec.config import SpecConfig

    ahead = _lookahead(SpecConfig(max_depth=5, sampling_width=2))  # room for two trees of 3
    while ahead.work():
        pass
    assert ahead.drafter.rows[-4:] == [2, 2 * 1, 2 * 2, 2 * 2]  # leaves, then 3 levels
    assert len(ahead.builders) == 2 and all(b.depth == 3 and b.done for b in ahead.builders)
    first, second = ahead.paths
    scores = ahead.tree.scores
    assert first[-1] != second[-1] and scores[first[-1]] >= scores[second[-1]]
    assert ahead.guesses == [(int(ahead.tree.tokens[p[-1]]) + 1) % 11 for p in ahead.paths]
    assert ahead.take(first[1:].tolist(), ahead.guesses[0] + 1) is None
    taken = ahead.take(second[1:].tolist(), ahead.guesses[1])
    assert taken is ahead.builders[1] and taken.tree().tokens[0] == ahead.guesses[1]

    no_room = SpecConfig(max_depth=3, sampling_width=2)
    assert len(_lookahead(no_room).leaves) == 1  # no room for two trees


def test_shape_chooser_counts_the_levels_drafted_ahead():
    """Where the next tree is drafted ahead whenever a round accepts its whole tree, a tree
    shallow enough to be accepted whole and to fit in a pass's waits costs only the pass: the
    chooser trades depth for it, and does not without guesses coming true."""
    from subspec.speculative.shape import ShapeChooser

    depths = {}
    for hit in (False, True):
        chooser = ShapeChooser(SpecConfig(max_depth=32, width=2))
        for accepted in (4, 8, 12, 16, 20, 20):  # acceptance fading with depth
            _rounds(chooser, [accepted, accepted], rounds=1, depth=20, step_s=0.3)
            chooser.observe_lookahead(accepted == 20, hit and accepted == 20, free_s=2.0)
        depths[hit] = chooser.shape().depth
    ahead = 2.0 / 0.3 - 1  # levels a pass's waits hold, after the guess's step
    assert depths[True] < depths[False] and depths[True] <= ahead + 1, depths


def test_round_slots_refuse_a_range_past_the_round():
    """One owner hands out a round's KV slots in order and refuses what the cache was not
    sized for."""
    from subspec.speculative.slots import RoundSlots

    slots = RoundSlots(10, 20, 30)
    assert slots.take(5) == 10 and slots.take(15) == 15 and slots.free == 0
    with pytest.raises(ValueError, match="cannot take 1 slots"):
        slots.take(1)
    with pytest.raises(ValueError, match="overruns"):
        RoundSlots(11, 20, 30)


class _RecordingDrafter(_NextTokenDrafter):
    """_NextTokenDrafter that keeps each step's mask and each relocation."""

    def __init__(self):
        super().__init__()
        self.masks, self.moves = [], []

    def step(self, tokens, positions, slots, mask, kv_len):
        self.masks.append(mask.clone())
        return super().step(tokens, positions, slots, mask, kv_len)

    def relocate(self, src_slots, dst_start):
        self.moves.append((src_slots.tolist(), dst_start))


def test_a_pruned_tree_is_verified_and_drafted_ahead_from_its_own_slots():
    """With --verify-nodes the target verifies a pruned, renumbered copy of the drafted tree
    at start + its index. Its draft KV moves there first, the lookahead guesses on its
    full-depth leaves with their paths' slots as context (not the drafted tree's, which the
    pass overwrites), and take() takes a path of it."""
    from subspec.config import SpecConfig
    from subspec.speculative.decoding import _verified
    from subspec.speculative.lookahead import Lookahead
    from subspec.speculative.proposals import Ranked
    from subspec.speculative.shape import Shape
    from subspec.speculative.slots import RoundSlots
    from subspec.speculative.tree import build_tree

    spec, start, drafter = SpecConfig(depth=3, guesses=1, verify_nodes=4), 4, _RecordingDrafter()
    drafted = build_tree(3, start, 3, 2, 0.2, drafter.step, "cpu")
    tree = _verified(drafted, spec.verify_nodes, drafter, start)
    # the draft's sure path: each level's best node, 1 + (level - 1) * width as drafted
    assert tree.origin.tolist() == [0, 1, 3, 5] and tree.depth == 3
    assert drafter.moves == [([4, 5, 7, 9], start)]
    assert _verified(drafted, 0, drafter, start) is drafted and len(drafter.moves) == 1

    slots = RoundSlots(start, spec.cache_slots, start + spec.cache_slots)
    slots.take(drafted.size)
    ahead = Lookahead(tree, slots, spec, Shape(3, 2), Ranked(0.2), drafter, "cpu")
    drafter.masks.clear()
    while ahead.work():
        pass
    leaf_context = drafter.masks[0][0]  # the guess's step: the leaf re-fed at a scratch slot
    scratch = start + drafted.size
    want = list(range(start)) + [start + 0, start + 1, start + 2] + [scratch]
    assert leaf_context.nonzero().flatten().tolist() == want
    assert ahead.take([1, 2, 3], ahead.guesses[0]) is ahead.builders[0]


def test_the_pass_model_fits_a_part_per_pass_and_a_part_per_node():
    """A pass's compute is a part per pass (the rebuild of the streamed weights) plus a part
    per node: fitted once rounds of several sizes are seen, proportional to the size before."""
    from subspec.speculative.shape import ShapeChooser

    chooser = ShapeChooser(SpecConfig(max_depth=32, width=2))
    chooser.observe_round(8, [8, 8], 33, 0.3 + 0.01 * 33 + 0.1, 0.1)
    assert chooser._pass_model()(66) == pytest.approx(2 * (0.3 + 0.01 * 33))
    for n in (17, 65):
        chooser.observe_round(8, [8, 8], n, 0.3 + 0.01 * n + 0.1, 0.1)
    model = chooser._pass_model()
    assert model(129) == pytest.approx(0.3 + 0.01 * 129)
    assert model(5) == pytest.approx(0.4 + 0.01 * (17 + 33 + 65) / 3)  # the mean pass

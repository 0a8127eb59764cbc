"""The terminal chat, driven by a scripted input() over the tests' fake runtime."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
from helpers import REPLY, FakeRuntime

from subspec.app.chat import run_chat, stat_line
from subspec.config import SamplingConfig
from subspec.runtime.generate import Event
from subspec.runtime.stats import GenerationStats, MemoryStats, SpecStats

ANSWER = " ".join(REPLY)


def chat(monkeypatch, engine, lines, method="subspec") -> list[str]:
    """Run a chat session on `lines` (strings, or exceptions for input() to raise; EOF after
    the last one); returns the prompts the engine decoded, as text."""
    script = list(lines)

    def fake_input(prompt=""):
        if not script:
            raise EOFError
        item = script.pop(0)
        if isinstance(item, BaseException) or isinstance(item, type):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)
    args = SimpleNamespace(max_new_tokens=8, stop=[], method=method)
    run_chat(engine, SamplingConfig(), args)
    assert not script, "the chat stopped reading input early"
    return [engine.tokenizer.decode(p) for p in engine.prompts]


def turn(role: str, text: str) -> str:
    return f"<|im_start|> {role} {text} <|im_end|>"


def test_history_is_kept_and_reset(monkeypatch, capsys):
    engine = FakeRuntime()
    prompts = chat(monkeypatch, engine, ["hello", "  ", "again", "/reset", "dog"])
    hello, again, assistant = turn("user", "hello"), turn("user", "again"), "<|im_start|> assistant"
    assert prompts[0] == f"{hello} {assistant}"
    assert prompts[1] == f"{hello} {turn('assistant', ANSWER)} {again} {assistant}"
    assert prompts[2] == f"{turn('user', 'dog')} {assistant}"
    out, err = capsys.readouterr()
    assert out.count(ANSWER) == 3
    assert "history cleared" in err
    assert err.count(f"{len(REPLY) + 1} tokens") == 3 and "tok/s" in err and "tau" in err


def test_exit_stops_reading(monkeypatch):
    engine = FakeRuntime()
    with pytest.raises(AssertionError, match="stopped reading input early"):
        chat(monkeypatch, engine, ["hello", "/exit", "never read"])
    assert len(engine.prompts) == 1


def test_oldest_turns_are_dropped_to_fit_the_context(monkeypatch, capsys):
    engine = FakeRuntime(context=30)  # one exchange is 13 tokens, a new question 6, +8 new
    too_long = " ".join(["dog"] * 30)
    prompts = chat(monkeypatch, engine, ["hello", "again", "dog", too_long, "cat"])
    assert len(prompts) == 4  # the over-long message never reached the engine
    assert "hello" not in prompts[2] and "again" in prompts[2] and "dog" in prompts[2]
    # the over-long message is refused without wiping the history before it
    assert "again" not in prompts[3] and "dog" in prompts[3] and too_long not in prompts[3]
    err = capsys.readouterr().err
    assert err.count("dropped the 1 oldest turn") == 2
    assert "does not fit the context" in err


class InterruptingRuntime(FakeRuntime):
    """Ctrl-C arrives after the first round of the first reply (or before it, if `at_once`)."""

    def __init__(self, at_once=False):
        super().__init__()
        self.at_once, self.interrupted = at_once, False

    def decode(self, request, gen, stats):
        for i, ids in enumerate(super().decode(request, gen, stats)):
            if not self.interrupted and i == (0 if self.at_once else 1):
                self.interrupted = True
                raise KeyboardInterrupt
            yield ids


def test_ctrl_c_stops_the_reply_and_keeps_what_was_said(monkeypatch, capsys):
    prompts = chat(monkeypatch, InterruptingRuntime(), ["hello", KeyboardInterrupt, "again"])
    assert turn("assistant", "the cat") in prompts[1]
    err = capsys.readouterr().err
    assert "[reply stopped]" in err and "/exit or Ctrl-D" in err


def test_ctrl_c_before_any_text_forgets_the_question(monkeypatch, capsys):
    prompts = chat(monkeypatch, InterruptingRuntime(at_once=True), ["hello", "again"])
    assert "hello" not in prompts[1]


def test_stat_line():
    memory = MemoryStats(0, 0.0, 0, 0.0, None, 0, 0, 0, {})
    stats = GenerationStats("vanilla", 3, 5, 0.1, 0.4, 12.345, 4, 0, memory)
    assert stat_line(Event("", [], "stop", stats)) == "[5 tokens, 12.35 tok/s]"
    spec = replace(
        stats,
        method="subspec",
        spec=SpecStats(
            2.5, 0.1, 0.2, 0.0, 4, 0, 2.0, 1.0, [2, 2], [1, 1], [1, 2], [[0.1, 0.2, 0.0]]
        ),
    )
    line = stat_line(Event("", [], "length", spec))
    assert line == "[5 tokens, 12.35 tok/s, tau 2.50, cut at --max-new-tokens]"

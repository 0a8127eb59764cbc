"""The Python API: subspec.load(...).generate / stream / chat, against the CLI on the same
prompt and settings."""

import json

import pytest
from helpers import minimum_budget

import subspec
from subspec.app.cli import main
from subspec.errors import SubspecError


@pytest.fixture(scope="module")
def budget(tiny_model_dir):
    return minimum_budget(tiny_model_dir, ("subspec",), dtype="float32")


@pytest.fixture(scope="module")
def llm(tiny_model_dir, budget):
    with subspec.load(str(tiny_model_dir), budget, dtype="float32", context=256,
                      progress=False) as model:  # fmt: skip
        yield model


def test_load_streams_and_speculates(llm):
    assert llm.method == "subspec" and llm.runtime.placement.streams


def test_greedy_generate_equals_the_cli_json(llm, tiny_model_dir, budget, capsys):
    result = llm.generate("hello world", max_tokens=10)
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "hello world",
                 "--max-new-tokens", "10", "--memory-budget", str(budget), "--dtype", "float32",
                 "--context", "256", "--json"])  # fmt: skip
    assert code == 0
    cli = json.loads(capsys.readouterr().out)
    assert result.token_ids == cli["token_ids"] and result.text == cli["text"]
    assert result.finish_reason == cli["stats"]["finish_reason"]
    assert result.stats.new_tokens == len(result.token_ids)


def test_stream_adds_up_to_generate(llm):
    whole = llm.generate("this is a test", max_tokens=8, temperature=0.8, seed=4)
    chunks = list(llm.stream("this is a test", max_tokens=8, temperature=0.8, seed=4))
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids][: whole.stats.new_tokens] == whole.token_ids
    assert chunks[-1].finish_reason == whole.finish_reason and chunks[-1].stats is not None


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "hello"}]
    reply = llm.chat(messages, max_tokens=6)
    ids = llm.runtime.encode_prompt("hello", chat=True)
    assert reply.stats.prompt_tokens == len(ids)


def test_bad_input_is_a_subspec_error(llm, tiny_model_dir):
    with pytest.raises(SubspecError, match="unknown option"):
        subspec.load(str(tiny_model_dir), depht=3)
    with pytest.raises(SubspecError, match="top-p"):
        llm.generate("hello", top_p=0)
    with pytest.raises(SubspecError, match="stop strings"):
        llm.generate("hello", stop=[""])


def test_chat_keeps_the_conversation_between_calls(llm):
    messages = [{"role": "user", "content": "hello"}]
    first = llm.chat(messages, max_tokens=6)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "a"}]
    second = llm.chat(messages, max_tokens=6)
    assert first.stats.prompt_tokens <= second.stats.cached_prompt_tokens
    assert second.stats.cached_prompt_tokens < second.stats.prompt_tokens


def test_generate_gives_a_logprob_per_token(llm):
    result = llm.generate("hello world", max_tokens=8, logprobs=2)
    assert [e.token for e in result.logprobs] == result.token_ids
    assert all(len(e.top) == 2 and e.top[0] == (e.token, e.logprob) for e in result.logprobs)
    assert llm.generate("hello world", max_tokens=8).logprobs is None


def test_subspec_with_nothing_streamed_decodes_with_vanilla(tiny_model_dir, caplog):
    """Substitutes stand in for streamed layers: with none, drafting would run the whole
    target, so the model decodes with vanilla and says so."""
    with subspec.load(str(tiny_model_dir), None, method="subspec", dtype="float32",
                      progress=False) as model:  # fmt: skip
        assert not model.runtime.placement.streams and model.method == "vanilla"
    assert "nothing streams" in caplog.text

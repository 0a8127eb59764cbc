"""Bad input gets a one-line error and a non-zero exit, never a traceback; good input works."""

import json
import shutil
import subprocess
import sys

import pytest

from subspec.app.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("subspec: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def gen(model, *extra):
    return ("generate", "--model", str(model), "--prompt", "hello world", "--max-new-tokens", "4",
            "--dtype", "float32", *extra)  # fmt: skip


def test_generate_json_has_the_promised_keys(capsys, tiny_model_dir):
    code, out, _ = run(capsys, *gen(tiny_model_dir, "--json", "--chat"))
    assert code == 0
    result = json.loads(out)
    assert result["token_ids"] and isinstance(result["text"], str)
    for key in ("method", "new_tokens", "prefill_s", "decode_s", "decode_tokens_per_s",
                "target_forwards", "bytes_streamed", "peak_rss_bytes", "memory_budget_bytes",
                "resident_bytes", "placement"):  # fmt: skip
        assert key in result["stats"], key
    assert result["stats"]["new_tokens"] == len(result["token_ids"]) == 4


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run(capsys, *gen(tmp_path / "nope"))
    assert_clean_error(code, err, "nope")


def test_malformed_config(capsys, tiny_model_dir, tmp_path):
    bad = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (bad / "config.json").write_text("{not json")
    code, _, err = run(capsys, *gen(bad))
    assert_clean_error(code, err, "config.json")


def test_unsupported_architecture_names_supported_ones(capsys, tiny_model_dir, tmp_path):
    bad = shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma3"}))
    code, _, err = run(capsys, *gen(bad))
    assert_clean_error(code, err, "gemma3", "llama", "qwen2")


def test_truncated_safetensors(capsys, tiny_model_dir, tmp_path):
    bad = shutil.copytree(tiny_model_dir, tmp_path / "m")
    st = next(bad.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    code, _, err = run(capsys, *gen(bad))
    assert_clean_error(code, err, "truncated")


@pytest.mark.parametrize("budget", ["lots", "1.2XB"])
def test_unparseable_budget(capsys, tiny_model_dir, budget):
    code, _, err = run(capsys, *gen(tiny_model_dir, "--memory-budget", budget))
    assert_clean_error(code, err, budget)


def test_budget_below_minimum_states_it(capsys, tiny_model_dir):
    code, _, err = run(capsys, *gen(tiny_model_dir, "--memory-budget", "10kB"))
    assert_clean_error(code, err, "minimum")


def test_prompt_longer_than_context(capsys, tiny_model_dir):
    argv = list(gen(tiny_model_dir, "--context", "32"))
    argv[argv.index("--prompt") + 1] = "hello world " * 40
    code, _, err = run(capsys, *argv)
    assert_clean_error(code, err, "context")


@pytest.mark.parametrize(
    "flags", [("--temperature", "-1"), ("--top-p", "0"), ("--top-k", "-3"), ("--depth", "0")]
)
def test_invalid_sampling_values(capsys, tiny_model_dir, flags):
    code, _, err = run(capsys, *gen(tiny_model_dir, *flags))
    assert_clean_error(code, err)


def test_classic_without_draft_model(capsys, tiny_model_dir):
    code, _, err = run(capsys, *gen(tiny_model_dir, "--method", "classic"))
    assert_clean_error(code, err, "--draft-model")


def test_unknown_model_name_lists_known(capsys):
    code, _, err = run(capsys, *gen("no-such-model"))
    assert_clean_error(code, err, "smollm2-135m-instruct")


def test_models_list(capsys):
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "qwen2.5-coder-1.5b-instruct" in out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("--device", "tpu"), "--device"),
        (("--stop", ""), "--stop"),
        (("--draft-model", "x"), "--draft-model"),
        (("--context", "100000"), "max_position_embeddings of 512"),
        (("--memory-budget", "1kB"), "smallest budget of each method"),
        (("--max-new-tokens", "0"), "--max-new-tokens"),
    ],
)
def test_bad_flags_are_one_line_refusals(capsys, tiny_model_dir, extra, needle):
    code, _, err = run(capsys, *gen(tiny_model_dir, *extra))
    assert_clean_error(code, err, needle)


@pytest.mark.parametrize(
    "extra, needle",
    [(("--port", "70000"), "--port"), (("--host", "no.such.host.invalid"), "--host")],
)
def test_bad_serve_address_is_a_refusal(capsys, tiny_model_dir, extra, needle):
    code, _, err = run(capsys, "serve", "--model", str(tiny_model_dir), *extra)
    assert_clean_error(code, err, needle)


def test_kv_cache_that_cannot_fit_is_refused(capsys, tiny_model_dir, monkeypatch):
    import subspec.runtime.sizing as sizing

    monkeypatch.setattr(sizing, "available_bytes", lambda device: 1000)
    code, _, err = run(capsys, *gen(tiny_model_dir))
    assert_clean_error(code, err, "KV cache", "needs")


def test_plan_reads_no_weights_and_names_minimums(capsys, tiny_model_dir, monkeypatch):
    from subspec.model.checkpoint import Checkpoint

    def no_reads(*a, **k):
        raise AssertionError("plan read a weight")

    monkeypatch.setattr(Checkpoint, "get", no_reads)
    code, out, _ = run(capsys, "plan", "--model", str(tiny_model_dir), "--memory-budget", "900kB",
                       "--dtype", "float32", "--json")  # fmt: skip
    assert code == 0
    report = json.loads(out)
    assert set(report["methods"]) == {"vanilla", "subspec"}
    for entry in report["methods"].values():
        assert entry["minimum_budget_bytes"] > 0 and entry["minimum_dominated_by"]
    code, _, err = run(capsys, "plan", "--model", str(tiny_model_dir), "--memory-budget", "1kB")
    assert_clean_error(code, err, "vanilla", "subspec", "biggest parts")


def test_plan_imports_no_torch(tiny_model_dir):
    """`subspec plan` sizes from headers alone, so it starts without torch (seconds saved)."""
    code = ("import sys; from subspec.app.cli import main; "
            f"main(['plan', '--model', {str(tiny_model_dir)!r}, '--memory-budget', '900kB']); "
            "sys.exit('torch' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "fits" in done.stdout


def test_memory_budget_auto_and_help_defaults(capsys, tiny_model_dir):
    code, out, err = run(capsys, *gen(tiny_model_dir, "--memory-budget", "auto", "--json"))
    assert code == 0 and "--memory-budget auto =" in err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "(default: 64)" in " ".join(capsys.readouterr().out.split())


def test_shape_defaults_match_the_config():
    """The CLI's defaults are SpecConfig's (depth auto, width 2); auto parses to None."""
    from subspec.app.cli import build_parser
    from subspec.app.options import spec_config
    from subspec.config import SpecConfig

    parser = build_parser()
    spec = spec_config(parser.parse_args(["bench", "--model", "m"]))
    assert (spec.depth, spec.width) == (SpecConfig.depth, SpecConfig.width) == (None, 2)
    auto = spec_config(parser.parse_args(["bench", "--model", "m", "--width", "auto"]))
    assert auto.width is None

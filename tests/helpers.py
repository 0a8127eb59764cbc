"""Helpers the tests share: tiny random models and tokenizers built offline, a runtime
builder with test defaults, and a fake runtime for the server and chat tests."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from subspec.config import RuntimeConfig, SamplingConfig, SpecConfig
from subspec.errors import SubspecError
from subspec.runtime.build import build_runtime
from subspec.runtime.generate import stream_generate
from subspec.runtime.runtime import Request
from subspec.runtime.stats import MemoryStats
from subspec.speculative.decoding import Batch

# Tiny models gain nothing from a second OpenMP thread, and when anything else holds a core the
# threads' spin-waiting makes each small op ~20x slower (measured: 2.4 s vs 0.14 s).
torch.set_num_threads(1)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts tokens with a small model and verifies them with a big one.",
    "def add(a, b):\n    return a + b\n",
    "What is the capital of France? The capital of France is Paris.",
    "Memory budgets decide which layers stay in RAM and which stream from disk.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer with ChatML special tokens and chat template, offline."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|im_start|>"),
    }


_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path, save_jinja_files=False)
    return path


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _family_config(family: str, tokenizer, shape: dict | None = None) -> PretrainedConfig:
    """transformers' own config of a tiny model of `family`, with the features that set the
    family apart (and non-default RoPE theta and norm eps, so a value read wrongly shows);
    `shape` overrides entries of _SHAPE."""
    common = {**_SHAPE, **(shape or {}), **_special_ids(tokenizer)}
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(
            **common, sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 50_000.0},
        )  # fmt: skip
    if family == "qwen2":  # qkv bias, untied head
        return Qwen2Config(
            **common, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )  # fmt: skip
    if family == "qwen3":  # q/k norms; head_dim 32 != hidden / heads (16)
        return Qwen3Config(
            **common, head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )  # fmt: skip
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def _perturb(model, seed: int) -> None:
    """Random values in what starts at zero or one (biases, norm weights), so that a bias or
    a norm the loader drops, or applies in the wrong place, changes the logits."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith(".bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif "norm" in name:
                t.copy_(1.0 + torch.randn(t.shape, generator=g) * 0.2)


def write_tiny(family: str, path: Path, seed: int = 0, perturb: bool = True,
               shape: dict | None = None) -> Path:  # fmt: skip
    """A random 3-layer float32 model of `family` (llama: tied embeddings; mistral: untied;
    qwen2: qkv bias, untied head; qwen3: q/k norms, head_dim 32) plus tokenizer at `path`;
    `perturb`: random biases and norm weights instead of transformers' zeros and ones;
    `shape`: other sizes than _SHAPE's."""
    tokenizer = build_tokenizer()
    config = _family_config(family, tokenizer, shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    if perturb:
        _perturb(model, seed)
    return _save(model, tokenizer, path)


def write_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A random 3-layer LlamaForCausalLM (tied embeddings, float32, norms at one) plus
    tokenizer at `path`: the model most tests run on."""
    return write_tiny("llama", path, seed, perturb=False)


def write_tiny_qwen2(path: Path, seed: int = 0) -> Path:
    """A random 3-layer Qwen2ForCausalLM (qkv bias, untied lm_head, float32) plus tokenizer."""
    return write_tiny("qwen2", path, seed)


def make_runtime(model_dir, methods=("vanilla",), budget=None, dtype="float32", spec=None,
                 draft=None, context=256, numerics=None, prefix_cache=True):  # fmt: skip
    """A runtime over a local model directory, quietly."""
    cfg = RuntimeConfig(
        model=str(model_dir), dtype=dtype, memory_budget=budget, context=context,
        methods=methods, spec=spec or SpecConfig(), draft_model=draft and str(draft),
        numerics=numerics, prefix_cache=prefix_cache,
    )  # fmt: skip
    return build_runtime(cfg, progress=False)


def minimum_budget(model_dir, methods=("vanilla",), dtype="float32", spec=None) -> int:
    """The smallest memory budget this model accepts, read from the refusal of a smaller one."""
    try:
        make_runtime(model_dir, methods, budget=1, dtype=dtype, spec=spec)
    except SubspecError as e:
        found = re.search(r"below this model's minimum.*?\((\d+) bytes\)", str(e))
        if found:
            return int(found.group(1))
        raise
    raise AssertionError("a budget of one byte was accepted")


def generate(runtime, method, prompt, max_new=24, sampling=None):
    """(token ids, the final GenerationStats) of one chat prompt."""
    ids = runtime.encode_prompt(prompt, chat=True)
    tokens, stats = [], None
    for ev in stream_generate(runtime, Request(ids, method, max_new, sampling or SamplingConfig())):
        tokens.extend(ev.token_ids)
        stats = ev.stats or stats
    return tokens, stats


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = "system user assistant hello world the cat sat on mat a dog ran far again".split()
REPLY = "the cat sat on the mat".split()


def tiny_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ChatML specials; <|im_end|> is the EOS."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    tok.chat_template = chat_template
    return tok


class FakeRuntime:
    """Just enough of a Runtime for stream_generate: `decode` replays `reply` then EOS, two
    tokens per round, and records every prompt it is given."""

    def __init__(self, reply=REPLY, context=64, tokenizer=None, delay=0.0, gate=None):
        """`gate` (a threading.Event): every decode waits for it before its first token."""
        self.tokenizer = tokenizer or tiny_tokenizer()
        self.cfg = SimpleNamespace(model="tiny-fake", context=context, spec=SpecConfig())
        self.methods = ("vanilla",)
        self.target = SimpleNamespace(device=torch.device("cpu"))
        self.placement = SimpleNamespace(summary=lambda: "placement: fake", streams=False)
        self.eos_ids = {self.tokenizer.eos_token_id}
        self.script = self.tokenizer.convert_tokens_to_ids(list(reply)) + [
            self.tokenizer.eos_token_id
        ]
        self.prompts: list[list[int]] = []
        self.delay, self.active, self.max_active, self.gate = delay, 0, 0, gate
        self.emitted: list[int] = []  # tokens each decode yielded, in order

    def check(self, prompt_len, max_new_tokens, method, logprobs=None):
        if prompt_len < 1:
            raise SubspecError("the prompt is empty")
        if prompt_len + max_new_tokens > self.cfg.context:
            raise SubspecError("prompt + new tokens exceeds the context")

    def start(self, prompt_ids):
        self.history = list(prompt_ids)
        return 0

    def unavailable(self):
        return None

    def decode(self, request, gen, stats):
        self.prompts.append(list(request.prompt_ids))
        self.emitted.append(0)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                self.gate.wait()
            for i in range(0, len(self.script), 2):
                time.sleep(self.delay)
                stats.accept_lengths.append(1)
                tokens = self.script[i : i + 2]
                self.emitted[-1] += len(tokens)
                yield Batch(tokens, torch.zeros(len(tokens), len(self.tokenizer)))
        finally:
            self.active -= 1

    def memory_stats(self):
        return MemoryStats(0, 0.0, 0, 0.0, None, 0, 0, 0, {})


def require_kernel(lib, name: str, x86_only: bool = True):
    """`lib` (a loaded kernel library); else a skip where this machine cannot build kernels or
    its CPU lacks the kernel's instructions, and a failure, with the compiler's message, where
    it could build and the build failed: a broken kernel must not turn the suite green."""
    from subspec.kernels import native

    if lib is not None:
        return lib
    if (error := native.build_error(name)) is not None:
        pytest.fail(f"the {name} kernel failed to build:\n{error}")
    pytest.skip(native.cannot_build(x86_only) or f"this CPU cannot run the {name} kernel")


def make_layer(seed: int) -> dict[str, torch.Tensor]:
    """A unit with mixed dtypes and odd shapes, including a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "q_proj.weight": torch.randn(7, 13, generator=g).to(torch.bfloat16),
        "q_proj.bias": torch.randn(7, generator=g),
        "mlp.down_proj.weight": torch.randn(3, 5, 11, generator=g).half(),
        "ids": torch.randint(-(2**40), 2**40, (9,), generator=g),
        "codes": torch.randint(-128, 127, (4097,), generator=g, dtype=torch.int8),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scale": torch.tensor(seed + 0.5),
        "empty": torch.empty(0, 3),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


class SetAfter:
    """An Event that reads as set from its `n`-th check on: a cancel arriving mid-prefill."""

    def __init__(self, n: int):
        self.n, self.checks = n, 0

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks > self.n

"""Shared fixtures: tiny random models built offline, and the real smollm2 pulled once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from subspec import hub

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


def write_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A random 3-layer LlamaForCausalLM (tied embeddings, float32) plus tokenizer at `path`."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(**_SHAPE, **_special_ids(tokenizer), tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    return _save(model, tokenizer, path)


def write_tiny_qwen2(path: Path, seed: int = 0) -> Path:
    """A random 3-layer Qwen2ForCausalLM (qkv bias, untied lm_head, float32) plus tokenizer."""
    tokenizer = build_tokenizer()
    config = Qwen2Config(**_SHAPE, **_special_ids(tokenizer), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # biases start at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.02)
    return _save(model, tokenizer, path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Directory of a tiny random Llama model (config, float32 safetensors, tokenizer)."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_model_dir(tmp_path_factory) -> Path:
    """Directory of a tiny random Qwen2 model (qkv bias, untied lm_head)."""
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, pulled into the subspec cache on first use."""
    return hub.resolve_model("smollm2-135m-instruct", progress=False)

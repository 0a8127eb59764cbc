"""Tiny random Llama checkpoints with a byte-level tokenizer, written offline (no network,
no transformers models): for machine checks (scripts/gpu-check) on any machine."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts a tree of tokens and the target verifies it in one pass.",
    "def add(a, b):\n    return a + b\n",
    "Memory budgets decide which layers stay resident and which stream from the slow tier.",
]


def write_tokenizer(path: Path, vocab_size: int) -> int:
    """A byte-level BPE tokenizer (ChatML specials and template) in `path`; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHATML,
    }  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def write_tiny_llama(
    path: Path, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
    intermediate: int = 128, seed: int = 0, vocab: int = 320,
) -> Path:  # fmt: skip
    """A random Llama checkpoint (untied head, float32) plus tokenizer at `path`."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path, vocab)
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02 * 4

    tensors = {
        "model.embed_tokens.weight": rand(vocab, hidden),
        "lm_head.weight": rand(vocab, hidden),
        "model.norm.weight": torch.ones(hidden),
    }
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {
        "self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }  # fmt: skip
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for name, shape in shapes.items():
            tensors[f"{prefix}.{name}.weight"] = rand(*shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}.{norm}.weight"] = 1 + rand(hidden)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 1024, "tie_word_embeddings": False,
        "torch_dtype": "float32", "eos_token_id": SPECIALS.index("<|im_end|>"),
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path

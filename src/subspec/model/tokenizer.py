"""Tokenization and chat templates, from the model's own tokenizer files."""

from __future__ import annotations

from pathlib import Path

from subspec.errors import SubspecError
from subspec.progress import quiet_libraries


def load_tokenizer(model_dir: Path):
    """The model's tokenizer (transformers' fast tokenizer over tokenizer.json)."""
    from transformers import AutoTokenizer

    quiet_libraries()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise SubspecError(f"cannot load the tokenizer in {model_dir}: {e}") from None


def encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Prompt token ids; with `chat`, one user turn through the chat template."""
    if chat:
        if not tokenizer.chat_template:
            raise SubspecError("this model has no chat template; drop --chat")
        messages = [{"role": "user", "content": prompt}]
        return encode_messages(tokenizer, messages)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the chat template, ready for the reply."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]

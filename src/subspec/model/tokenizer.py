"""Tokenization and chat templates, from the model's own tokenizer files."""

from __future__ import annotations

import re
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


def token_text(tokenizer, token_id: int) -> str:
    """One token's text, as decoding it alone gives (U+FFFD for part of a character)."""
    return tokenizer.decode([token_id])


def token_bytes(tokenizer, token_id: int) -> bytes:
    """One token's exact bytes: a byte-level BPE token through GPT-2's byte alphabet, a
    SentencePiece byte token (<0x0A>) as its byte, another piece with its spaces (U+2581)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if (byte := _BYTE_TOKEN.fullmatch(piece)) is not None:
        return bytes([int(byte.group(1), 16)])
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel" and all(c in _BYTE_OF_CHAR for c in piece):
        return bytes(_BYTE_OF_CHAR[c] for c in piece)
    return piece.replace("\u2581", " ").encode()


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte: printable bytes stand for themselves, the
    others for 256 + their rank."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


_BYTE_OF_CHAR = _byte_alphabet()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

"""Log probabilities in the OpenAI API's two shapes: chat completions' `logprobs.content` and
legacy completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`."""

from __future__ import annotations

from collections.abc import Sequence

from subspec.model.tokenizer import token_bytes, token_text
from subspec.runtime.logprobs import TokenLogprob


class ChatLogprobs:
    """Chat completions' shape: each token with its text, bytes and top alternatives."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, entries: Sequence[TokenLogprob]) -> dict:
        return {"content": [self._entry(e) for e in entries], "refusal": None}

    def _entry(self, e: TokenLogprob) -> dict:
        return {**self._token(e.token, e.logprob),
                "top_logprobs": [self._token(t, lp) for t, lp in e.top]}  # fmt: skip

    def _token(self, token_id: int, logprob: float) -> dict:
        tok = self.tokenizer
        return {"token": token_text(tok, token_id), "logprob": logprob,
                "bytes": list(token_bytes(tok, token_id))}  # fmt: skip


class CompletionLogprobs:
    """Legacy completions' shape, one chunk after another: `text_offset` (each token's offset
    in the completion's text, tokens' texts laid end to end) runs on across chunks."""

    def __init__(self, tokenizer):
        self.tokenizer, self.offset = tokenizer, 0

    def __call__(self, entries: Sequence[TokenLogprob]) -> dict:
        texts = [token_text(self.tokenizer, e.token) for e in entries]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [
                {token_text(self.tokenizer, t): lp for t, lp in e.top} for e in entries
            ],  # fmt: skip
            "text_offset": offsets,
        }

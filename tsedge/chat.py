"""Multi-turn chat over an Engine: the chat template, streaming text, KV reuse across turns."""

from __future__ import annotations

from collections.abc import Callable

from tsedge.engine import Engine, GenerationResult
from tsedge.sampling import SamplingParams


class ChatSession:
    """Keeps the conversation; each turn re-renders it and the engine reuses the cached prefix."""

    def __init__(self, engine: Engine, sampling: SamplingParams = SamplingParams(),
                 max_new_tokens: int = 512) -> None:
        self.engine = engine
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.messages: list[dict[str, str]] = []
        self._partial: list[int] = []

    def reset(self) -> None:
        self.messages = []
        self.engine.reset()

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Add a user message, generate the reply (streamed to ``on_text``), record it."""
        tok = self.engine.tokenizer
        self.messages.append({"role": "user", "content": text})
        ids = tok.encode(tok.apply_chat_template(self.messages))
        stream = tok.stream(skip_special_tokens=True)
        self._partial = []

        def on_token(token: int) -> None:
            self._partial.append(token)
            if on_text is not None:
                on_text(stream.push(token))

        result = self.engine.generate(ids, self.max_new_tokens, self.sampling, on_token=on_token)
        if on_text is not None:
            on_text(stream.flush())
        self._record(result.tokens)
        return result

    def interrupted(self) -> None:
        """After Ctrl-C in ``send``: keep what was generated as the assistant's reply."""
        self._record(self._partial)

    def _record(self, tokens: list[int]) -> None:
        text = self.engine.tokenizer.decode(tokens, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})

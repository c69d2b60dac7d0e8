"""Multi-turn chat over an Engine: the chat template, streaming text, KV reuse across turns, and
dropping the oldest turns when the conversation outgrows the KV cache."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tsedge.engine import ContextOverflowError, Engine, GenerationResult, PrefillProgress
from tsedge.sampling import SamplingParams

Message = dict[str, str]


@dataclasses.dataclass
class Reply:
    """One assistant reply and what it took to fit it in the KV cache."""

    text: str
    result: GenerationResult
    dropped_turns: int  # oldest (user, assistant) turns dropped from the conversation to fit it


class ChatSession:
    """Keeps the conversation (an optional system prompt, then user/assistant turns); each turn
    re-renders it and the engine reuses the cached prefix.

    A turn is sent only if its prompt plus ``max_new_tokens`` fits the KV cache, after dropping
    the oldest turns if needed (the system prompt stays). When even the system prompt and the new
    message leave no room for a whole reply but the prompt itself fits, the reply runs until the
    cache is full (``result.stopped == "context_full"``).
    """

    def __init__(self, engine: Engine, sampling: SamplingParams = SamplingParams(),
                 max_new_tokens: int = 512, system: str | None = None) -> None:
        self.engine = engine
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.turns: list[tuple[str, str]] = []  # (user, assistant)
        self.last: Reply | None = None
        self._pending = ""
        self._partial: list[int] = []

    @property
    def messages(self) -> list[Message]:
        """The conversation as chat-template messages."""
        return self._render(self.turns)

    def reset(self) -> None:
        """Forget the turns (the system prompt stays) and clear the KV cache."""
        self.turns = []
        self.last = None
        self.engine.reset()

    def send(self, text: str, on_text: Callable[[str], None] | None = None,
             on_prefill: PrefillProgress | None = None) -> Reply:
        """Add a user message, generate the reply (streamed to ``on_text``), record it.

        Raises ContextOverflowError, keeping the conversation as it was, when the system prompt
        and this message alone exceed the KV cache.
        """
        ids, dropped = self._fit(text)
        del self.turns[:dropped]
        tok = self.engine.tokenizer
        stream = tok.stream(skip_special_tokens=True)
        self._pending, self._partial = text, []

        def on_token(token: int) -> None:
            self._partial.append(token)
            if on_text is not None:
                on_text(stream.push(token))

        result = self.engine.generate(ids, self.max_new_tokens, self.sampling, on_token=on_token,
                                      on_prefill=on_prefill)
        if on_text is not None:
            on_text(stream.flush())
        self.last = Reply(self._record(result.tokens), result, dropped)
        return self.last

    def interrupted(self) -> None:
        """After Ctrl-C in ``send``: keep what was generated as the assistant's reply."""
        self._record(self._partial)

    def _render(self, turns: list[tuple[str, str]], user: str | None = None) -> list[Message]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in turns:
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        if user is not None:
            messages.append({"role": "user", "content": user})
        return messages

    def _fit(self, text: str) -> tuple[list[int], int]:
        """Prompt ids for ``text`` after the fewest dropped turns that leave room for a whole
        reply, and how many turns that drops."""
        capacity = self.engine.cache.capacity
        for dropped in range(len(self.turns) + 1):
            ids = self.engine.tokenizer.encode_chat(self._render(self.turns[dropped:], text))
            if len(ids) + self.max_new_tokens <= capacity:
                return ids, dropped
        if len(ids) <= capacity:  # a reply shorter than max_new_tokens still fits
            return ids, len(self.turns)
        with_system = " with the system prompt" if self.system else ""
        raise ContextOverflowError(
            f"this message{with_system} takes {len(ids)} tokens, more than the KV cache of "
            f"{capacity} tokens holds; send a shorter one or restart chat with a larger --max-context")

    def _record(self, tokens: list[int]) -> str:
        text = self.engine.tokenizer.decode(tokens, skip_special_tokens=True)
        self.turns.append((self._pending, text))
        return text

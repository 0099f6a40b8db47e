"""A conversation with a chat model: keeps the history, streams replies, drops the oldest turns when the
history outgrows the context."""

from __future__ import annotations

from collections.abc import Iterator

from .generate import LM, Detokenizer, SamplingParams, generate_ids


class ChatSession:
    def __init__(self, lm: LM, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
                 top_p: float | None = 0.95, seed: int | None = None):
        self.lm, self.system = lm, system
        self.settings = dict(temperature=temperature, top_p=top_p, seed=seed)
        self.max_new_tokens = min(max_new_tokens, lm.model.config.context // 2)
        self.messages: list[dict] = []
        self.dropped = 0
        self._partial = ""

    def reset(self) -> None:
        self.messages, self.dropped = [], 0

    def _prompt(self) -> list[int]:
        """The conversation as prompt ids, dropping the oldest turns until a reply fits the context."""
        context = self.lm.model.config.context
        self.dropped = 0
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.lm.tokenizer.encode_chat(head + self.messages)
            if len(ids) + self.max_new_tokens <= context or len(self.messages) <= 1:
                return ids[-(context - self.max_new_tokens):]
            self.messages.pop(0)  # forget the oldest exchange: a history starts with the user speaking
            self.dropped += 1
            while self.messages and self.messages[0]["role"] == "assistant":
                self.messages.pop(0)
                self.dropped += 1

    def send(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the reply's pieces; the reply joins the history."""
        self.messages.append({"role": "user", "content": text})
        prompt = self._prompt()
        stop, stop_ids = self.lm.tokenizer.chat_stops()
        params = SamplingParams(max_new_tokens=self.max_new_tokens, stop=stop, **self.settings)
        det = Detokenizer(self.lm.tokenizer, stop, stop_ids)
        self._partial = ""
        for tokens in generate_ids(self.lm.model, [prompt], params, self.lm.tokenizer.vocab_size):
            piece = det.push(int(tokens[0]))
            self._partial += piece
            if piece:
                yield piece
            if det.done:
                break
        tail = det.flush()
        self._partial += tail
        if tail:
            yield tail
        self.messages.append({"role": "assistant", "content": self._partial})

    def interrupted(self) -> None:
        """Ctrl-C mid-reply: keep what was said so far."""
        self.messages.append({"role": "assistant", "content": self._partial})

"""A conversation with a chat model: keeps the history, streams replies, drops the oldest turns when the
history outgrows the context."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from . import chat_template
from .engine import LM, Engine, Request
from .generate import GenerationError, SamplingParams


class ChatSession:
    """`max_new_tokens`: the longest reply; None: half the context, at most 256. A reply's prompt keeps as many of
    the latest turns as fit beside it. The conversation is rendered with the model's own chat template."""

    def __init__(self, lm: LM, system: str | None = None, max_new_tokens: int | None = None, temperature: float = 0.7,
                 top_p: float | None = 0.95, seed: int | None = None):
        self.lm, self.system = lm, system
        stop, self.stop_ids = chat_template.chat_stops(lm.tokenizer)
        context = lm.model.config.context
        # checked now, not at the first message
        self.params = SamplingParams(max_new_tokens=min(256, context // 2) if max_new_tokens is None else max_new_tokens,
                                     temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        if self.params.max_new_tokens >= context:
            raise GenerationError(f"a reply of up to {self.params.max_new_tokens} tokens leaves no room for the "
                                  f"conversation in the model's context of {context}; ask for fewer")
        self.engine = Engine(lm.model, lm.tokenizer, max_batch=1)
        self.messages: list[dict] = []
        self.dropped = 0
        self._partial = ""
        self._turn: object | None = None  # the reply queued and not yet read to its end

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    def reset(self) -> None:
        if self._turn is not None:
            self.engine.abort()
            self._turn = None
        self.messages, self.dropped = [], 0

    def _prompt(self) -> list[int]:
        """The conversation as prompt ids, dropping the oldest turns until a reply fits the context."""
        context = self.lm.model.config.context
        self.dropped = 0
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            ids = chat_template.encode_chat(self.lm.tokenizer, head + self.messages)
            if len(ids) + self.max_new_tokens <= context:
                return ids
            if len(self.messages) <= 1:
                self.messages.pop()
                raise GenerationError(f"this message makes a prompt of {len(ids)} tokens; with {self.max_new_tokens} "
                                      f"for the reply it does not fit the model's context of {context}")
            self.messages.pop(0)  # forget the oldest exchange: a history starts with the user speaking
            self.dropped += 1
            while self.messages and self.messages[0]["role"] == "assistant":
                self.messages.pop(0)
                self.dropped += 1

    def send(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the reply's pieces; the reply joins the history. A message that
        cannot fit the context is refused (GenerationError) before anything is streamed. A previous reply not
        read to its end is stopped where its reader left it (as `interrupted`)."""
        if self._turn is not None:
            self.engine.abort()
            self.interrupted()
        self.messages.append({"role": "user", "content": text})
        self.engine.add(Request(self._prompt(), self.params, self.stop_ids))
        self._partial, self._turn = "", object()
        return self._reply(self._turn)

    def _reply(self, turn: object) -> Iterator[str]:
        try:
            while self._turn is turn and self.engine.has_work():
                for out in self.engine.step():
                    self._partial += out.text
                    if out.text:
                        yield out.text
        finally:  # interrupted (Ctrl-C, the caller stopped reading): free the row, unless a newer reply has it
            if self._turn is turn and self.engine.has_work():
                self.engine.abort()
        if self._turn is turn:
            self._turn = None
            self.messages.append({"role": "assistant", "content": self._partial})

    def interrupted(self) -> None:
        """Ctrl-C mid-reply: keep what was said so far."""
        if self._turn is not None:
            self._turn = None
            self.messages.append({"role": "assistant", "content": self._partial})


def terminal(session: ChatSession) -> None:
    """`gptkit chat`: read messages from the terminal and stream the replies until Ctrl-D or /exit."""
    print("chat with the model; Ctrl-C stops a reply, Ctrl-D (or /exit) leaves, /reset forgets the conversation")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
        elif text:
            _reply(session, text)


def _reply(session: ChatSession, text: str) -> None:
    try:
        reply = session.send(text)
    except GenerationError as e:  # a message that cannot fit: say so, keep chatting
        print(f"gptkit: {e}", file=sys.stderr)
        return
    print("model> ", end="", flush=True)
    try:
        for piece in reply:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        session.interrupted()
        print(" [stopped]", end="")
    print()
    if session.dropped:
        print(f"(the conversation outgrew the context: forgot its {session.dropped} earliest message(s))")

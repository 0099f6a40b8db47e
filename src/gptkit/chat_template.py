"""A model's own chat template: the Jinja program its tokenizer files carry (transformers' `chat_template`, GGUF's
`tokenizer.chat_template`), rendered in jinja2's immutable sandbox with the environment transformers gives it
(`apply_chat_template`: trim_blocks, lstrip_blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`).
gptkit's ChatML is the template of models that bring none. Also the SFT loss mask: which characters of a rendered
conversation the assistant says.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

from .errors import GptkitError

EOT = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # ChatML role delimiters (tokenizer.py's)
# gptkit's own template (ChatML), for vocabularies with <|im_start|> / <|im_end|> and no template of their own
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class ChatTemplateError(GptkitError):
    """A chat template that does not compile, fails to render, or reaches outside the sandbox."""


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # as transformers': Jinja's own tojson escapes HTML characters
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile(source: str, origin: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{origin}: the chat template does not compile: {e.message} (line {e.lineno})") from None


class ChatTemplate:
    """A chat template with the special tokens it may name (`bos_token`, `eos_token`, as transformers passes them)."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 origin: str = "chat template"):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"{origin}: a chat template must be a non-empty string")
        self.source, self.bos_token, self.eos_token, self.origin = source, bos_token, eos_token, origin
        self._template = _compile(source, origin)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as transformers' `apply_chat_template(..., tokenize=False)`."""
        import jinja2

        extra = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v is not None}
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **extra)
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"{self.origin}: the chat template tried to leave its sandbox ({e})") from None
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{self.origin}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"{self.origin}: the chat template failed on these messages "
                                    f"({type(e).__name__}: {e})") from None

    def assistant_spans(self, messages: list[dict], end_of_turn: tuple[str, ...] = ()) -> list[tuple[int, int]]:
        """Character spans of `render(messages)` that the assistant says: each assistant message as the template
        writes it after its generation prompt, up to and including its end-of-turn token (what follows that, e.g.
        a newline, is the template's). Found by rendering each prefix of the conversation: a template whose
        rendering of a prefix is not a prefix of the whole is refused."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True)) if i else 0
            upto = self.render(messages[:i + 1])
            if not full.startswith(upto) or start > len(upto):
                raise ChatTemplateError(f"{self.origin}: the template renders a conversation's beginning differently "
                                        f"from the whole, so the assistant's parts cannot be found for training")
            end = len(upto)
            ends = [upto.rfind(t, start) + len(t) for t in end_of_turn if upto.rfind(t, start) >= 0]
            spans.append((start, max(ends) if ends else end))
        return spans


# --- a tokenizer's conversations (any object with tokenizer.Tokenizer's attributes: this module imports no tokenizer)

def template_of(tokenizer) -> ChatTemplate | None:
    """The template a tokenizer's conversations are rendered with: the model's own, else gptkit's ChatML when the
    vocabulary has its tokens, else None (plain "Role: text" lines)."""
    if tokenizer.chat_template is not None:
        return ChatTemplate(tokenizer.chat_template, tokenizer.bos, tokenizer.eos)  # (compiled once: cached)
    if all(t in tokenizer.special for t in CHAT_TOKENS):
        return ChatTemplate(CHATML, tokenizer.bos, tokenizer.eos, origin="gptkit's ChatML")
    return None


def encode_chat(tokenizer, messages: list[dict], with_mask: bool = False, reply: bool = True):
    """A conversation as token ids: the one chat template (`template_of`), for serving and training alike. Special
    tokens come from the template's text only, never from a message's content. `reply`: end where the assistant
    speaks next (a prompt). `with_mask`: return (ids, mask) with mask 1 on what a model learns to say, each
    assistant message and its end-of-turn token."""
    template = template_of(tokenizer)
    if template is None:
        if with_mask:
            raise ChatTemplateError(f"training on conversations needs a chat template or the chat tokens "
                                    f"{', '.join(CHAT_TOKENS)}")
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return tokenizer.encode(text + ("Assistant:" if reply else ""))
    text = template.render(messages, add_generation_prompt=reply)
    ids, starts = tokenizer.encode_rendered(text, _content_spans(text, messages))
    if not with_mask:
        return ids
    ends = tuple(t for t in (tokenizer.eot, tokenizer.eos, CHAT_TOKENS[1]) if t is not None and t in tokenizer.special)
    spans = template.assistant_spans(messages, ends)
    return ids, [int(any(a <= s < b for a, b in spans)) for s in starts]


def chat_stops(tokenizer) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(stop strings, stop token ids) that end an assistant turn: the model's end-of-turn / EOS tokens."""
    template = template_of(tokenizer)
    if template is None:
        eot = tokenizer.special.get(EOT)
        return ("\nUser:", "\nSystem:"), ((eot,) if eot is not None else ())
    ends = [tokenizer.eot, tokenizer.eos, EOT] + [CHAT_TOKENS[1]] * (CHAT_TOKENS[1] in template.source)
    ids = [tokenizer.special[t] for t in ends if t is not None and t in tokenizer.special]
    return (), tuple(dict.fromkeys(ids))


def _content_spans(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Where each message's content appears in the rendered text, in order (a template that rewrote a content
    leaves it unmarked)."""
    spans, at = [], 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str) and content:
            i = text.find(content, at)
            if i >= 0:
                spans.append((i, i + len(content)))
                at = i + len(content)
    return spans

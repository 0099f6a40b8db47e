"""ChatSession: replies are their own (an unread one never leaks into the next), the reply length asked for is the
one used, and the model's own chat template shapes the prompt."""

import pytest

import gptkit
from gptkit.chat import ChatSession
from gptkit.generate import GenerationError


@pytest.fixture
def lm(tiny_ckpt):
    return gptkit.load(tiny_ckpt)


def test_an_unread_reply_does_not_leak_into_the_next(lm):
    session = ChatSession(lm, max_new_tokens=6, temperature=0)
    session.send("hi")  # never read
    second = "".join(session.send("there"))
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == "" and not session.engine.has_work()
    fresh = ChatSession(lm, max_new_tokens=6, temperature=0)
    fresh.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    assert second == "".join(fresh.send("there"))  # the same reply as with that history, nothing of the first


def test_a_half_read_reply_keeps_what_was_read(lm):
    session = ChatSession(lm, max_new_tokens=10, temperature=0)
    reply = session.send("hi")
    first = next(reply)
    "".join(session.send("again"))
    assert session.messages[1] == {"role": "assistant", "content": first}
    reply.close()  # the abandoned reader, closed late, touches nothing of the newer reply
    assert len(session.messages) == 4


def test_max_new_tokens_is_the_one_asked_for(lm):
    context = lm.model.config.context
    assert ChatSession(lm, max_new_tokens=context - 10).max_new_tokens == context - 10  # was cut to context // 2
    assert ChatSession(lm).max_new_tokens == min(256, context // 2)
    with pytest.raises(GenerationError, match="leaves no room"):
        ChatSession(lm, max_new_tokens=context)


def test_the_models_template_shapes_the_prompt(tiny_ckpt):
    from gptkit import Tokenizer

    tok = Tokenizer.load(tiny_ckpt)
    template = "{% for m in messages %}<|im_start|>{{ m.role }}:{{ m.content }}<|im_end|>{% endfor %}" \
               "{% if add_generation_prompt %}<|im_start|>bot:{% endif %}"
    (tiny_ckpt / "tokenizer_config.json").write_text(f'{{"chat_template": {__import__("json").dumps(template)}}}')
    session = ChatSession(gptkit.load(tiny_ckpt), max_new_tokens=4, temperature=0)
    session.messages = [{"role": "user", "content": "hi"}]
    assert session._prompt() == tok.encode("<|im_start|>user:hi<|im_end|><|im_start|>bot:", allow_special=True)

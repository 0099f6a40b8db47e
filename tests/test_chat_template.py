"""A model's own chat template: rendered in jinja2's sandbox equal to transformers' apply_chat_template, used for
chat prompts and the SFT loss mask, its end of turn a stop; refusals in one line."""

import pytest

from gptkit import Tokenizer, gguf
from gptkit.chat_template import ChatTemplate, ChatTemplateError, encode_chat, template_of
from gptkit.files import atomic_write


def save(tokenizer, directory):
    for name, text in tokenizer.files().items():
        atomic_write(directory / name, text)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Ça va ?\n\n  Bien?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Say <|im_end|> literally"}],
]
# Llama 3's shape: BOS from the tokenizer, headers, a default system date line, tojson on a non-string
LLAMA3_LIKE = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nToday: ' + "
               "'26 Jul 2024' + '<|im_end|>\n' }}{% endif %}{% for message in messages %}"
               "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + "
               "message['role']) }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
               "{%- if message.content is string %}{{ message['content'] | trim }}{% else %}{{ message.content | tojson }}"
               "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def theirs(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("prompt", [True, False])
def test_smollm2_template_renders_as_transformers(smollm2_gguf, theirs, messages, prompt):
    ours = gguf.read_tokenizer(smollm2_gguf)
    text = template_of(ours).render(messages, add_generation_prompt=prompt)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    # its default system prompt where the conversation brings none
    assert ("You are a helpful AI assistant named SmolLM" in text) == (messages[0]["role"] != "system")
    expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt, return_dict=False)
    if "<|im_end|> literally" not in text:  # (transformers lets a message's text inject a special token; we do not)
        assert encode_chat(ours, messages, reply=prompt) == list(expected)


def test_message_text_never_injects_a_special_token(smollm2_gguf):
    ours = gguf.read_tokenizer(smollm2_gguf)
    ids = encode_chat(ours, CONVERSATIONS[3])
    assert ids.count(ours.special["<|im_end|>"]) == 2  # the system turn's and the user turn's, not the text's


def test_a_template_with_bos_and_filters_renders_as_transformers(bpe):
    transformers = pytest.importorskip("transformers")
    tok = bpe.add_special_tokens(["<|begin|>"])
    ours = Tokenizer(tok.engine, bos="<|begin|>", eos="<|im_end|>", chat_template=LLAMA3_LIKE)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.engine, bos_token="<|begin|>",
                                                  eos_token="<|im_end|>")
    messages = [{"role": "user", "content": "  padded  "}, {"role": "assistant", "content": ["a", 1]}]
    for prompt in (True, False):
        assert template_of(ours).render(messages, prompt) == theirs.apply_chat_template(
            messages, chat_template=LLAMA3_LIKE, tokenize=False, add_generation_prompt=prompt)


def test_sft_mask_covers_the_assistant_parts_only(smollm2_gguf):
    ours = gguf.read_tokenizer(smollm2_gguf)
    ids, mask = encode_chat(ours, CONVERSATIONS[1], with_mask=True, reply=False)
    said = ours.decode([i for i, m in zip(ids, mask) if m])
    assert said == "Bonjour !<|im_end|>"
    assert ids == encode_chat(ours, CONVERSATIONS[1], reply=False)


def test_the_template_travels_with_the_checkpoint(tmp_path, smollm2_gguf):
    ours = gguf.read_tokenizer(smollm2_gguf)
    save(ours, tmp_path)
    back = Tokenizer.load(tmp_path)
    assert (back.chat_template, back.bos, back.eos, back.add_bos) == (ours.chat_template, ours.bos, ours.eos, False)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert template_of(Tokenizer.load(tmp_path)).render([{"role": "user", "content": "x"}]) == "[x]"  # as transformers


def test_models_without_a_template_keep_chatml(bpe):
    assert bpe.chat_template is None
    text = template_of(bpe).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("source, words", [
    ("{% for m in messages %}{{ m.content }", "does not compile"),
    ("{{ raise_exception('only user and assistant roles are supported') }}", "only user and assistant roles"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox"),
    ("{{ messages.append(1) }}", "sandbox"),
    ("{{ messages[0]['content'] + 1 }}", "failed on these messages"),
])
def test_a_bad_template_is_one_line(source, words):
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(source, origin="m/tokenizer_config.json").render([{"role": "user", "content": "x"}])
    assert words in str(e.value) and "m/tokenizer_config.json" in str(e.value) and "\n" not in str(e.value)


def test_a_broken_template_in_a_checkpoint_fails_at_load(tmp_path, bpe):
    save(bpe, tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    from gptkit import checkpoint

    with pytest.raises(Exception) as e:
        checkpoint.load_tokenizer(tmp_path)
    assert "does not compile" in str(e.value)

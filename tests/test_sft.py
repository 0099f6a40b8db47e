"""Instruction fine-tuning and chat: a held-out instruction is answered after SFT and not before."""

import json
import random
import string

import pytest
import torch

import gptkit
from gptkit import GPT, Tokenizer, checkpoint, preset
from gptkit.chat import ChatSession
from gptkit.chat_template import encode_chat
from gptkit.finetune import FinetuneConfig, FinetuneError
from gptkit.finetune.sft import encode_conversation, load_conversations, sft


def word(rng):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.choice((3, 4))))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    tok = Tokenizer.char(string.ascii_lowercase + " :\n").add_special_tokens(("<|im_start|>", "<|im_end|>"))
    checkpoint.save(d / "base", GPT(preset("tiny-gpt2", n_layer=2, n_head=2, n_embd=64, context=64,
                                           vocab_size=tok.vocab_size)), tok)
    rng = random.Random(0)
    held_out = {"zqxv", "mbo"}
    words = [w for w in (word(rng) for _ in range(900)) if w not in held_out]
    rows = [{"messages": [{"role": "user", "content": f"repeat: {w}"}, {"role": "assistant", "content": w}]}
            for w in words]
    for name, part in (("train", rows[:800]), ("val", rows[800:])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = FinetuneConfig(epochs=25, lr=3e-3, batch_size=32, patience=25)
    sft(d / "base", load_conversations(d / "train.jsonl"), load_conversations(d / "val.jsonl"), d / "chat", cfg,
        quiet=True)
    return d, held_out


def reply(path, text):
    session = ChatSession(gptkit.load(path), max_new_tokens=8, temperature=0)
    return "".join(session.send(text)), session


def test_held_out_instruction_answered_after_sft_and_not_before(tuned):
    d, held_out = tuned
    for w in held_out:
        assert reply(d / "chat", f"repeat: {w}")[0] == w
    assert all(reply(d / "base", f"repeat: {w}")[0] != w for w in held_out)


def test_chat_keeps_the_conversation_and_drops_old_turns(tuned):
    d, _ = tuned
    text, session = reply(d / "chat", "repeat: abc")
    for w in ("dog", "cat", "owl", "emu", "yak", "eel"):
        assert "".join(session.send(f"repeat: {w}")) == w
    assert session.messages[-1] == {"role": "assistant", "content": "eel"}
    assert session.dropped > 0 and len(session.messages) < 14  # 64-token context: old turns were forgotten


def test_loss_only_on_assistant_tokens():
    tok = Tokenizer.char(string.ascii_lowercase + ":\n").add_special_tokens(("<|im_start|>", "<|im_end|>"))
    ids, mask = encode_conversation(tok, [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}], 64)
    learned = [tok.decode([i]) for i, m in zip(ids, mask) if m]
    assert learned == ["c", "<|im_end|>"]


def test_conversations_without_an_assistant_turn(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(FinetuneError, match="c.jsonl:1: the conversation has no assistant turn"):
        load_conversations(tmp_path / "c.jsonl")


def test_training_and_serving_share_one_chat_template(bpe):
    """What SFT learns to say follows exactly the prompt that serving builds for the same conversation."""
    talk = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello 🙂"}]
    trained, mask = encode_chat(bpe, talk, with_mask=True, reply=False)
    prompt = encode_chat(bpe, talk[:2])
    assert trained[:len(prompt)] == prompt
    learned = [t for t, m in zip(trained, mask) if m]
    assert learned == bpe.encode("hello 🙂") + [bpe.special["<|im_end|>"]]
    assert trained[len(prompt):len(prompt) + len(learned)] == learned

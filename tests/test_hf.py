"""Parity with transformers: same weights, same logits; and a bit-exact round trip."""

import pytest
import torch
import transformers

from gptkit import checkpoint, hf

ARCHS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=120, n_positions=64)),
    "gpt1": lambda: transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(
        n_layer=2, n_embd=64, n_head=4, vocab_size=120, n_positions=64)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=120, max_position_embeddings=64, tie_word_embeddings=False, rope_theta=5000.0)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=120, max_position_embeddings=64, tie_word_embeddings=True)),
}


@pytest.fixture(params=list(ARCHS))
def saved(request, tmp_path):
    torch.manual_seed(0)
    model = ARCHS[request.param]().eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path


def test_logits_match_transformers(saved):
    theirs, tmp = saved
    ours = hf.load(tmp / "hf")
    ids = torch.randint(0, 120, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-4)


def test_round_trip_is_bit_exact(saved):
    theirs, tmp = saved
    hf.convert_from_hf(tmp / "hf", tmp / "ours")
    hf.convert_to_hf(tmp / "ours", tmp / "back")
    again = type(theirs).from_pretrained(tmp / "back")
    a, b = theirs.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_travels_both_ways(tmp_path, bpe):
    from gptkit import GPT, preset

    model = GPT(preset("tiny-gpt2", vocab_size=bpe.vocab_size, context=64))
    checkpoint.save(tmp_path / "ours", model, bpe)
    hf.convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert fast("def add(a, b):")["input_ids"] == bpe.encode("def add(a, b):")
    hf.convert_from_hf(tmp_path / "hf", tmp_path / "again")
    assert checkpoint.load_tokenizer(tmp_path / "again").encode("héllo 🙂") == bpe.encode("héllo 🙂")


def test_unsupported_architecture_is_refused(tmp_path):
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    ).save_pretrained(tmp_path)
    with pytest.raises(hf.ConversionError, match="unsupported transformers architecture 'gpt_neox'"):
        hf.load(tmp_path)


def test_banded_model_has_no_transformers_form(tmp_path):
    from gptkit import GPT, preset

    checkpoint.save(tmp_path / "c", GPT(preset("tiny-gpt3", vocab_size=50)))
    with pytest.raises(hf.ConversionError, match="banded"):
        hf.convert_to_hf(tmp_path / "c", tmp_path / "out")


def test_the_default_preset_exports_as_qwen3_with_our_logits(tmp_path, bpe):
    """tiny-modern (QK-norm) has a transformers form: Qwen3, whose loader reads it with logits equal to ours."""
    from gptkit import GPT, preset

    torch.manual_seed(0)
    ours = GPT(preset("tiny-modern", vocab_size=bpe.vocab_size, context=64)).eval()
    with torch.no_grad():  # non-trivial norm weights, so that a q_norm/k_norm mix-up would show
        for block in ours.blocks:
            block.attn.q_norm.weight.uniform_(0.5, 1.5), block.attn.k_norm.weight.uniform_(0.5, 1.5)
    checkpoint.save(tmp_path / "ours", ours, bpe)
    hf.convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM" and theirs.config.eos_token_id == bpe.eot_id
    ids = torch.randint(0, bpe.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=1e-4)


def test_a_tokenizer_that_fails_to_read_is_an_error_not_none(tmp_path, capsys):
    from gptkit.cli import main

    torch.manual_seed(0)
    ARCHS["gpt2"]().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{not json")
    capsys.readouterr()  # (save_pretrained's progress bars)
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gptkit: ") and err.count("\n") == 1
    assert "hf/tokenizer.json: the tokenizer cannot be read" in err
    assert not (tmp_path / "out").exists()  # nothing written (it was a checkpoint gptkit.load refuses)
    (tmp_path / "hf" / "tokenizer.json").unlink()
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 0
    assert checkpoint.load_tokenizer(tmp_path / "out") is None  # genuinely absent: no tokenizer, said so at load


def test_the_chat_template_and_special_tokens_come_along(tmp_path, bpe):
    from gptkit import GPT, preset
    from gptkit.chat_template import template_of

    template = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    torch.manual_seed(0)
    ARCHS["gpt2"]().save_pretrained(tmp_path / "hf")
    model = GPT(preset("tiny-gpt2", vocab_size=bpe.vocab_size, context=64))
    checkpoint.save(tmp_path / "ours", model, bpe)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.engine, bos_token="<|endoftext|>",
                                                eos_token="<|im_end|>")
    fast.chat_template = template
    hf.convert_to_hf(tmp_path / "ours", tmp_path / "hf2")
    fast.save_pretrained(tmp_path / "hf2")
    hf.convert_from_hf(tmp_path / "hf2", tmp_path / "again")
    tok = checkpoint.load_tokenizer(tmp_path / "again")
    assert (tok.chat_template, tok.bos, tok.eos) == (template, "<|endoftext|>", "<|im_end|>")
    messages = [{"role": "user", "content": "hi"}]
    assert template_of(tok).render(messages) == fast.apply_chat_template(messages, tokenize=False)
    hf.convert_to_hf(tmp_path / "again", tmp_path / "back")  # and written back out
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back").chat_template == template

import pytest
import torch

import gptkit
from gptkit import GPT, GenerationError, SamplingParams, Tokenizer, preset
from gptkit.engine import generate_tokens
from gptkit.generate import Detokenizer, apply_repetition_penalty, beam_search, sample


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0),
                                 dict(min_p=2.0), dict(repetition_penalty=0), dict(max_new_tokens=0),
                                 dict(num_beams=0), dict(temperature=float("nan")), dict(stop=("",))])
def test_invalid_sampling_settings(bad):
    with pytest.raises(GenerationError):
        SamplingParams(**bad)


def test_truncating_settings_reduce_to_greedy():
    logits = torch.randn(4, 50)
    greedy = sample(logits, temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(sample(logits, top_k=1), greedy)
    assert torch.equal(sample(logits, top_p=1e-6), greedy)
    assert torch.equal(sample(logits, min_p=1.0), greedy)


def test_top_k_and_top_p_only_sample_the_kept_tokens():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)
    assert probs[0] < 0.8 < probs[:2].sum()  # top_p=0.8 keeps exactly tokens 0 and 1
    assert set(sample(logits, top_p=0.8, generator=gen).tolist()) == {0, 1}


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_detokenizer_never_splits_a_character(bpe):
    ids = bpe.encode("aꙮb")  # ꙮ (3 UTF-8 bytes) is not in the training text: one token per byte
    assert len(ids) >= 4
    det = Detokenizer(bpe)
    pieces = [det.push(i) for i in ids] + [det.finish("length")]
    assert "".join(pieces) == "aꙮb"
    assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_cuts_at_stop_string_and_holds_back_prefixes():
    tok = Tokenizer.char("abcdefghijklmnopqrstuvwxyz ")
    det = Detokenizer(tok, stop=("stop",))
    pieces = []
    for i in tok.encode("go on st stop here"):
        pieces.append(det.push(i))
        if det.done:
            break
    assert "".join(pieces) == "go on st "
    assert det.finish_reason == "stop"
    assert "".join(pieces[:len("go on st st")]) == "go on st "  # a possible start of "stop" is held back


@pytest.fixture
def lm(tiny_ckpt):
    return gptkit.load(tiny_ckpt)


def test_generate_is_reproducible_with_a_seed(lm):
    a = lm.generate("def add", max_new_tokens=30, seed=7)
    assert a == lm.generate("def add", max_new_tokens=30, seed=7)
    assert a != lm.generate("def add", max_new_tokens=30, seed=8)


def test_stream_pieces_join_to_the_generated_text(lm):
    pieces = list(lm.stream("The quick", max_new_tokens=40, temperature=0))
    assert "".join(pieces) == lm.generate("The quick", max_new_tokens=40, temperature=0)
    assert len(pieces) > 1


def test_stop_string_ends_generation(lm):
    full = lm.generate("The quick", max_new_tokens=40, temperature=0)
    stop = full[10:13]
    cut = lm.generate("The quick", max_new_tokens=40, temperature=0, stop=[stop])
    assert cut == full[:full.index(stop)]
    assert lm.finish_reasons == ["stop"]


def test_batched_text_generation_equals_single(lm):
    prompts = ["The quick", "def add(a, b):\n", "Ü"]
    batched = lm.generate(prompts, max_new_tokens=15, temperature=0)
    assert batched == [lm.generate(p, max_new_tokens=15, temperature=0) for p in prompts]


def test_prompt_longer_than_context_is_refused(lm):
    with pytest.raises(GenerationError, match="exceeds the model's context of 64"):
        lm.generate("word " * 100, max_new_tokens=5)


def test_beam_search_scores_at_least_greedy():
    torch.manual_seed(0)
    model = GPT(preset("tiny-modern", vocab_size=40, context=64)).eval()
    prompt = [1, 2, 3]

    def logprob(tokens):
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            lp = model(ids)[0, :-1].log_softmax(-1)
        return lp[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum().item()

    greedy = generate_tokens(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0))[0]
    assert beam_search(model, prompt, 1, 12) == greedy
    beams = beam_search(model, prompt, 4, 12)
    assert len(beams) == 12 and logprob(beams) >= logprob(greedy) - 1e-5


def test_beam_search_through_the_api(lm):
    out = lm.generate("The quick", max_new_tokens=10, num_beams=3)
    assert isinstance(out, str) and out == lm.generate("The quick", max_new_tokens=10, num_beams=3)


def test_detokenizer_decodes_a_bounded_window_per_token(bpe):
    """O(new tokens) per token, not the whole sequence again: each decode call sees a few tokens."""
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé 中文 🙂 " * 20
    seen = []

    class Counting:
        special_by_id = bpe.special_by_id

        def decode(self, ids):
            seen.append(len(ids))
            return bpe.decode(ids)

    det = Detokenizer(Counting())
    ids = bpe.encode(text)
    assert "".join(det.push(t) for t in ids) + det.finish("length") == text
    assert len(ids) > 300 and max(seen) <= 8


def test_detokenizer_hides_special_tokens_and_stops_at_stop_ids(bpe):
    end = bpe.special["<|im_end|>"]
    det = Detokenizer(bpe, stop_ids=(bpe.eot_id,))
    pieces = [det.push(t) for t in bpe.encode("ab") + [end] + bpe.encode("cd") + [bpe.eot_id] + bpe.encode("ef")]
    assert "".join(pieces) == "abcd" and det.finish_reason == "stop"


def test_engine_refuses_what_it_cannot_honour(lm):
    from gptkit.engine import Engine, Request

    engine = Engine(lm.model, lm.tokenizer, max_batch=2)
    with pytest.raises(GenerationError, match="beam search"):
        engine.add(Request([1, 2], SamplingParams(num_beams=2)))
    with pytest.raises(GenerationError, match="token ids"):
        engine.add(Request([10**6], SamplingParams()))
    with pytest.raises(GenerationError, match="context"):
        engine.add(Request([1] * 60, SamplingParams(max_new_tokens=10)))


@pytest.mark.parametrize("bad", [dict(seed=1 << 64), dict(seed=-(1 << 63) - 1), dict(presence_penalty=2.5),
                                 dict(frequency_penalty=-3), dict(logprobs=21)])
def test_invalid_openai_style_settings(bad):
    with pytest.raises(GenerationError):
        SamplingParams(**bad)


def test_the_library_stops_at_endoftext(lm):
    from gptkit.engine import generate_tokens

    ids = generate_tokens(lm.model, [lm.encode_prompt("x")], SamplingParams(max_new_tokens=30, temperature=0))[0]
    stop_at = ids[5]  # pretend this token is the end of the document
    out = generate_tokens(lm.model, [lm.encode_prompt("x")], SamplingParams(max_new_tokens=30, temperature=0),
                          stop_ids=(stop_at,))[0]
    assert out == ids[:ids.index(stop_at) + 1]


def test_stream_checks_the_prompt_before_anything_is_produced(lm):
    with pytest.raises(GenerationError, match="context"):
        lm.stream("word " * 100, max_new_tokens=5)  # raised by the call, not at the first piece


def test_chat_refuses_a_message_longer_than_the_context(lm):
    from gptkit.chat import ChatSession

    session = ChatSession(lm, max_new_tokens=8, temperature=0)
    with pytest.raises(GenerationError, match="does not fit"):
        session.send("word " * 100)
    assert session.messages == []
    assert isinstance("".join(session.send("hi")), str) and len(session.messages) == 2


def test_chat_checks_its_settings_when_created(lm):
    from gptkit.chat import ChatSession

    with pytest.raises(GenerationError, match="temperature"):
        ChatSession(lm, temperature=-1)


def test_sampling_follows_the_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(20000, 1)
    got = torch.bincount(sample(logits, generator=torch.Generator().manual_seed(0)), minlength=5) / 20000
    torch.testing.assert_close(got, logits[0].softmax(-1), atol=0.01, rtol=0)
    assert got[4] == 0


class _Markov:
    """A stand-in model and stepper whose next-token logits depend only on the last token (beam search's
    interface: a stepper's prefill / decode / logits, and its model's config and new_cache)."""

    def __init__(self, table):
        from types import SimpleNamespace

        self.table, self.config, self.model = table, SimpleNamespace(context=64), self

    def new_cache(self, batch, max_len):
        from types import SimpleNamespace

        return SimpleNamespace(device="cpu", advance=lambda n: None, reorder=lambda rows: None)

    def prefill(self, ids, cache):
        return ids[..., None]  # "hidden states": the tokens themselves

    def logits(self, h):
        return self.table[h[:, 0]]

    def decode(self, tokens, cache):
        return self.table[tokens]


def test_beam_search_does_not_stop_before_a_live_beam_can_overtake():
    """With length_penalty 1 a long likely continuation (sum -0.92 over 10 tokens: -0.09) beats ending at once
    (-0.51): comparing the finished normalised score with the live beam's raw sum stopped too early."""
    big = 20.0
    table = torch.full((4, 4), -big)
    table[3] = torch.tensor([0.6, 0.4, 1e-9, 1e-9]).log()  # after the prompt: end (0.6) or "a" (0.4)
    table[1, 1] = big  # "a" is followed by "a" with certainty
    assert beam_search(_Markov(table), [3], 1, 10, eot_id=0, length_penalty=1.0) == [1] * 10


def test_beam_search_never_yields_ids_past_the_tokenizer():
    table = torch.zeros(6, 6)
    table[:, 5] = 10.0  # the most likely id is a padding row of the vocabulary
    out = beam_search(_Markov(table), [1], 2, 5, vocab_limit=5)
    assert out and max(out) < 5


def test_the_stop_string_that_occurs_first_in_the_text_wins():
    """Before, the first stop string of the list won: stops ["b", "ab"] on "xab" gave "xa"."""
    tok = Tokenizer.char("xab")
    det = Detokenizer(tok, stop=("b", "ab"))
    text = "".join(det.push(t) for t in tok.encode("xab")) + det.finish("length")
    assert text == "x" and det.finish_reason == "stop"


def test_a_stream_ending_inside_a_character_ends_with_the_replacement_character(bpe):
    """Before, `finish` dropped a final incomplete UTF-8 tail; transformers and tiktoken decode it as U+FFFD."""
    ids = bpe.encode("aꙮ")[:-1]  # ꙮ is one token per byte here: the stream stops inside it
    det = Detokenizer(bpe)
    text = "".join(det.push(t) for t in ids) + det.finish("length")
    assert text == bpe.decode(ids) and text.startswith("a") and text.endswith("\ufffd")

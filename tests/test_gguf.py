"""GGUF export and import: round trips, transformers' GGUF loader as the oracle, llama.cpp itself (slow), refusals."""

import pytest
import torch

from gptkit import GPT, Tokenizer, checkpoint, preset
from gptkit.cli import main
from gptkit.gguf import export, import_gguf
from gptkit.quantize import QuantEmbedding, QuantLinear, dequantize_weight, interleave, quantize_weight

gguf = pytest.importorskip("gguf")

CONFIGS = {
    "gpt2": dict(name="tiny-gpt2"),
    "llama": dict(name="tiny-modern", qk_norm=False),  # llama.cpp's llama has no QK-norm
}


def save(tmp_path, bpe, arch, context=64, **changes):
    torch.manual_seed(0)
    spec = {**CONFIGS[arch], **changes}
    model = GPT(preset(spec.pop("name"), vocab_size=bpe.vocab_size, context=context, **spec)).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0: a wrong mapping shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    checkpoint.save(tmp_path / arch, model, bpe)
    return tmp_path / arch, model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_f32_round_trip_is_exact(tmp_path, bpe, arch):
    src, model = save(tmp_path, bpe, arch)
    assert main(["export", str(src), "--type", "f32", "--out", str(tmp_path / "m.gguf")]) == 0
    assert main(["convert", "--from-gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    back = checkpoint.load_model(tmp_path / "back")
    assert back.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    tokenizer = checkpoint.load_tokenizer(tmp_path / "back")
    text = "def add(a, b):\n    return a + b  # Ünïcödé"
    assert tokenizer.encode(text) == bpe.encode(text) and tokenizer.special == bpe.special


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformers_reads_our_export_with_our_logits(tmp_path, bpe, arch):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    # transformers' gpt2 GGUF loader assumes a context of 1024 (it mishandles any other)
    src, model = save(tmp_path, bpe, arch, context=1024 if arch == "gpt2" else 64)
    export(src, tmp_path / "m.gguf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", torch_dtype=torch.float32).eval()
    ids = torch.tensor([bpe.encode("The quick brown fox jumps over")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, bits", [("q8_0", 8), ("q4_0", 4)])
def test_q8_0_and_q4_0_are_gptkit_blocks(tmp_path, bpe, kind, bits):
    src, model = save(tmp_path, bpe, "llama")
    export(src, tmp_path / "m.gguf", kind)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    assert tensor.tensor_type.name == kind.upper()
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    back = checkpoint.load_model(tmp_path / "back")  # the blocks as they are: gptkit's int8 / int4, no floats
    assert back.records.quantization["bits"] == bits and isinstance(back.blocks[0].mlp.proj, QuantLinear)
    w = model.blocks[0].mlp.proj.weight
    q, d = interleave(*quantize_weight(w, bits, 32))
    assert torch.equal(back.blocks[0].mlp.proj.qweight, q) and torch.equal(back.blocks[0].mlp.proj.scales, d)
    expected = dequantize_weight(*quantize_weight(w, bits, 32), bits)
    torch.testing.assert_close(back.blocks[0].mlp.proj.dequantize(), expected, atol=0, rtol=0)
    export(tmp_path / "back", tmp_path / "again.gguf", kind)  # and back out: the same tensors
    for x, y in zip(reader.tensors, gguf.GGUFReader(str(tmp_path / "again.gguf")).tensors):
        if kind == "q4_0" and x.name == "token_embd.weight":
            continue  # gptkit's embeddings are int8 only: a Q4_0 one is re-quantized to int8 at import
        assert x.name == y.name and x.tensor_type == y.tensor_type and (x.data == y.data).all(), x.name


@pytest.mark.parametrize("name, changes, reason", [
    ("tiny-gpt1", {}, "post-norm"), ("tiny-gpt3", {}, "banded"), ("tiny-modern", {}, "QK-norm"),
    ("tiny-modern", {"qk_norm": False, "activation": "relu2"}, "ReLU"),
])
def test_what_llama_cpp_cannot_run_is_refused(tmp_path, bpe, capsys, name, changes, reason):
    model = GPT(preset(name, vocab_size=bpe.vocab_size, context=64, **changes))
    checkpoint.save(tmp_path / "m", model, bpe)
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf")]) == 1
    assert reason in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()


def test_a_character_vocabulary_is_refused(tmp_path, capsys):
    chars = Tokenizer.char("hello world")
    checkpoint.save(tmp_path / "m", GPT(preset("tiny-gpt2", vocab_size=chars.vocab_size, context=64)), chars)
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf")]) == 1
    assert "no merges" in capsys.readouterr().err


def test_bad_gguf_files(tmp_path, bpe, capsys):
    def fails(path, says):
        assert main(["convert", "--from-gguf", str(path), "--out", str(tmp_path / "out")]) == 1
        assert says in capsys.readouterr().err
        assert not (tmp_path / "out").exists()

    (tmp_path / "text.gguf").write_text("not a model")
    fails(tmp_path / "text.gguf", "not a GGUF file (no GGUF magic number)")
    fails(tmp_path / "none.gguf", "no such file")
    src, _ = save(tmp_path, bpe, "gpt2")
    export(src, tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    fails(tmp_path / "cut.gguf", "cut short")

    writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_tensor("token_embd.weight", torch.zeros(20, 8).numpy())
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    fails(tmp_path / "bert.gguf", "architecture 'bert'")

    writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "gpt2")
    writer.add_token_list([f"t{i}" for i in range(10)])
    writer.add_tensor("token_embd.weight", torch.zeros(20, 8).numpy())
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    fails(tmp_path / "vocab.gguf", "10 tokens in the vocabulary but 20 rows")


def test_a_quantized_checkpoint_exports_its_blocks(tmp_path, bpe):
    src, model = save(tmp_path, bpe, "gpt2")
    main(["quantize", str(src), "--bits", "8", "--out", str(tmp_path / "q8")])
    export(tmp_path / "q8", tmp_path / "q.gguf", "q8_0")
    export(src, tmp_path / "f.gguf", "q8_0")
    a, b = (gguf.GGUFReader(str(tmp_path / n)) for n in ("q.gguf", "f.gguf"))
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name and (x.data == y.data).all(), x.name


# --- llama.cpp itself ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A gpt2 and a llama model trained a little (random weights give flat logits: no comparison at all)."""
    import textwrap

    from gptkit.data import prepare, read_sources
    from gptkit.train import load_recipe, train

    d = tmp_path_factory.mktemp("trained")
    (d / "t.txt").write_text(open(textwrap.__file__, encoding="utf-8").read() * 2)
    prepare(read_sources(texts=[str(d / "t.txt")]), d / "data", tokenizer="bpe", vocab_size=512)
    runs = {}
    for arch, overrides in {"gpt2": [], "llama": ["model.qk_norm=false"]}.items():
        train(load_recipe(None, ["block_size=64", "batch_size=16", "lr=3e-3", "warmup_steps=10", *overrides],
                          preset=CONFIGS[arch]["name"], data=str(d / "data"), out=str(d / arch), max_steps=150),
              quiet=True)
        runs[arch] = d / arch
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind, atol", [("f32", 1e-3), ("q8_0", None)])
def test_llama_cpp_runs_our_export_with_our_logits(trained, tmp_path, arch, kind, atol):
    llama_cpp = pytest.importorskip("llama_cpp", reason="build it: python benchmarks/gguf_llama_cpp.py --build (minutes)")
    import numpy as np

    import gptkit

    lm = gptkit.load(trained[arch])
    export(trained[arch], tmp_path / "m.gguf", kind)
    ids = lm.tokenizer.encode("def wrap(text, width=70):")
    # an f32 KV cache: llama.cpp's default f16 one rounds keys and values (differences of ~1e-3 in the logits)
    theirs = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                             type_k=0, type_v=0)
    theirs.eval(ids)
    their_logits = torch.from_numpy(np.array(theirs.scores[:len(ids)], dtype=np.float32))
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids]))[0, :, :their_logits.shape[1]]
    if atol is not None:
        torch.testing.assert_close(their_logits, ours, atol=atol, rtol=0)
    else:  # q8_0 against gptkit fp32: close, and the same choices
        assert (their_logits - ours).abs().max() < 0.15
        assert (their_logits.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9
    theirs.reset()
    greedy_theirs = []
    for token in theirs.generate(ids, temp=0.0, top_k=1):
        greedy_theirs.append(token)
        if len(greedy_theirs) == 16:
            break
    from gptkit.engine import generate_tokens
    from gptkit.generate import SamplingParams

    greedy_ours = generate_tokens(lm.model, [ids], SamplingParams(max_new_tokens=16, temperature=0))[0]
    if kind == "f32":
        assert greedy_theirs == greedy_ours


# --- what people download: SmolLM2-135M-Instruct's Q4_1 file ---------------------------------------------------

def test_smollm2_reads_quantized_as_it_is(smollm2, smollm2_gguf):
    model, tokenizer = smollm2
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.kv_heads, c.vocab_size, c.rope_theta, c.tie_embeddings) == \
        (30, 576, 9, 3, 49152, 1e5, True)
    # Q4_1 has no gptkit kernel: re-quantized to int4; the Q8_0 token embedding (also the tied head) kept as it is
    assert model.records.quantization["bits"] == 4 and model.records.quantization["embedding_bits"] == 8
    assert isinstance(model.wte, QuantEmbedding) and isinstance(model.blocks[0].attn.qkv, QuantLinear)
    reader = gguf.GGUFReader(str(smollm2_gguf))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    raw = embd.data.reshape(49152, 18, 34)
    q = torch.from_numpy(raw[..., 2:].copy().view("int8").reshape(49152, 576))
    assert torch.equal(model.wte.dequantize()[:100], dequantize_weight(
        q[:100], torch.from_numpy(raw[:100, :, :2].copy().view("float16").reshape(100, 18)), 8))
    from gptkit.chat import ChatSession
    from gptkit.engine import LM

    session = ChatSession(LM(model, tokenizer), max_new_tokens=8, temperature=0)  # through the model's template
    assert "".join(session.send("What is the capital of France?")).startswith("The capital of France is Paris")


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_gguf_loader(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    from gptkit.gguf import read

    ours, tokenizer = read(smollm2_gguf, "fp32")  # dequantized, as transformers reads the file
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                               dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("Ça va? 12345 — def f(x):\n    return x ** 2  🙂 naïve")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-3, rtol=0)


def test_a_gguf_works_wherever_a_checkpoint_does(tmp_path, bpe, capsys):
    import gptkit

    src, model = save(tmp_path, bpe, "llama")
    export(src, tmp_path / "m.gguf", "q8_0")
    lm = gptkit.load(tmp_path / "m.gguf")
    assert lm.model.records.quantization["bits"] == 8
    text = lm.generate("def add", max_new_tokens=5, temperature=0)
    assert text == gptkit.load(src).generate("def add", max_new_tokens=5, temperature=0) or isinstance(text, str)
    assert main(["generate", str(tmp_path / "m.gguf"), "--prompt", "def", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def")
    (tmp_path / "t.txt").write_text("def add(a, b):\n    return a + b\n" * 4)
    assert main(["eval", str(tmp_path / "m.gguf"), "--task", "ppl", "--data", str(tmp_path / "t.txt")]) == 0
    assert (tmp_path / "m.gguf.eval" / "ppl-t.json").exists()


def test_export_names_the_split_llama_cpp_knows(tmp_path, bpe, capsys):
    """transformers' GPT-2 tokenizer (ByteLevel applying GPT-2's regex itself, no Split) is llama.cpp's gpt-2."""
    import json

    from tokenizers import Regex, pre_tokenizers

    src, _ = save(tmp_path, bpe, "gpt2")
    spec = json.loads(bpe.engine.to_str())
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (src / "tokenizer.json").write_text(json.dumps(spec))
    export(src, tmp_path / "m.gguf")
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    engine = Tokenizer.load(src).engine
    engine.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\w+|\W"), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    (src / "tokenizer.json").write_text(engine.to_str())
    assert main(["export", str(src), "--out", str(tmp_path / "other.gguf")]) == 1
    assert "no pre-tokenizer name" in capsys.readouterr().err and not (tmp_path / "other.gguf").exists()


def _write(path, arch="llama", **fields):
    """A small GGUF with a vocabulary, written field by field (for the refusals)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model(fields.get("model", "gpt2"))
    if "pre" in fields:
        writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 1])
    writer.add_token_merges(["a b"])
    for key, value in fields.get("extra", {}).items():
        writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", torch.zeros(3, 8).numpy())
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    return path


@pytest.mark.parametrize("fields, says", [
    (dict(arch="mamba"), "architecture 'mamba' is not read"),
    (dict(pre="chatglm-bpe"), "pre-tokenizer 'chatglm-bpe' is not one gptkit reads"),
    (dict(model="llama"), "SentencePiece vocabularies"),
    (dict(model="bert"), "only byte-level BPE"),
])
def test_what_gguf_import_does_not_read_is_refused_by_name(tmp_path, capsys, fields, says):
    path = _write(tmp_path / "m.gguf", **fields)
    with pytest.raises(gptkit_errors().GptkitError) as e:
        from gptkit.gguf import read_tokenizer, read

        read_tokenizer(path) if fields.get("arch") is None else read(path)
    assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def gptkit_errors():
    from gptkit import errors

    return errors


@pytest.mark.slow
def test_info_says_how_each_type_is_kept(smollm2_gguf, capsys):
    assert main(["info", str(smollm2_gguf)]) == 0
    out = capsys.readouterr().out
    assert "Q4_1: 210 tensors, re-quantized at load to int4" in out
    assert "Q8_0: 1 tensors, kept as it is" in out and "pre-tokenizer smollm" in out

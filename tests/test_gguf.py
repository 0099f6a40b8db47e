"""GGUF export and import: round trips, transformers' GGUF loader as the oracle, llama.cpp itself (slow), refusals."""

import pytest
import torch

from gptkit import GPT, Tokenizer, checkpoint, preset
from gptkit.cli import main
from gptkit.gguf import export, import_gguf
from gptkit.quantize import dequantize_weight, quantize_weight

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
    back = checkpoint.load_model(tmp_path / "back")
    w = model.blocks[0].mlp.proj.weight
    expected = dequantize_weight(*quantize_weight(w, bits, 32), bits)
    torch.testing.assert_close(back.blocks[0].mlp.proj.weight, expected, atol=0, rtol=0)


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
    fails(tmp_path / "text.gguf", "not a readable GGUF")
    fails(tmp_path / "none.gguf", "no such file")
    src, _ = save(tmp_path, bpe, "gpt2")
    export(src, tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    fails(tmp_path / "cut.gguf", "not a readable GGUF")

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
    llama_cpp = pytest.importorskip("llama_cpp", reason="build it: python benchmarks/gguf.py --build (minutes)")
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

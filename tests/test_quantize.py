"""Weight-only int8/int4 quantization: the kernels against dequantize-then-matmul, llama.cpp's block layout,
quantized checkpoints through every command, the perplexity cost on a trained model, and bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import gptkit
from gptkit import GPT, checkpoint, kernels, preset
from gptkit.cli import main
from gptkit.data import prepare, read_sources
from gptkit.quantize import (QuantEmbedding, QuantizeError, QuantLinear, deinterleave, dequantize, dequantize_weight,
                             interleave, quantize, quantize_weight)
from gptkit.train import load_recipe, train

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C compiler with OpenMP on this machine")


def relative_error(y, ref):
    return ((y - ref).norm() / ref.norm()).item()


@pytest.fixture(params=["native", "portable"])
def kernel_path(request, monkeypatch):
    """Each build of the kernels this machine can run: -march=native (AVX2 integer dots here) and plain C."""
    if request.param == "portable":
        monkeypatch.setenv("GPTKIT_PORTABLE_KERNELS", "1")
    kernels._library.cache_clear()
    yield request.param
    monkeypatch.delenv("GPTKIT_PORTABLE_KERNELS", raising=False)
    kernels._library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17, 32])
@pytest.mark.parametrize("K, group", [(64, 32), (96, 32), (768, 32), (192, 64), (288, 96)])
def test_quantized_kernel_equals_dequantize_then_linear(kernel_path, bits, rows, K, group):
    torch.manual_seed(rows * K + bits)
    w, x, b = torch.randn(257, K), torch.randn(rows, 1, K), torch.randn(257)  # 257 outputs: odd, no multiple
    q, s = quantize_weight(w, bits, group)
    with torch.inference_mode():
        y = kernels.quant_linear(x, *interleave(q, s), b, bits, group)  # 32 groups of 8 rows, one row after
    ref = F.linear(x, dequantize_weight(q, s, bits), b)
    assert y.shape == ref.shape
    # the native build quantizes activations to int8 blocks as llama.cpp does (about 0.5% relative error), and so
    # does the GEMM of every build; the plain C decode kernel keeps them fp32
    fp32_activations = kernel_path == "portable" and rows < kernels.GEMM_MIN_ROWS
    assert relative_error(y, ref) < (1e-5 if fp32_activations else 2e-2)


@pytest.mark.parametrize("rows", [8, 13, 5])
def test_layers_hold_their_blocks_interleaved(rows):
    q, s = quantize_weight(torch.randn(rows, 64), 4, 32)
    qi, si = interleave(q, s)
    if rows >= 8:  # chunk 1 (bytes 4-7) of row 0 comes right after chunk 0 of rows 0-7
        assert torch.equal(qi.flatten()[32:36], q[0, 4:8]) and torch.equal(si[0, :2], s[:2, 0])
    assert all(torch.equal(a, b) for a, b in zip(deinterleave(qi, si), (q, s)))
    layer = QuantLinear.of(dequantize_weight(q, s, 4), None, 4, 32)
    assert torch.equal(layer.state_dict()["qweight"], qi)
    torch.testing.assert_close(layer.dequantize(), dequantize_weight(q, s, 4), atol=0, rtol=0)
    embedding, (q8, s8) = QuantEmbedding(rows, 64, 32), quantize_weight(torch.randn(rows, 64), 8, 32)
    embedding.load_state_dict(dict(zip(("qweight", "scales"), interleave(q8, s8))))
    idx = torch.tensor([[rows - 1, 0, rows // 2]])  # looked up from the interleaved rows
    torch.testing.assert_close(embedding(idx), dequantize_weight(q8, s8, 8)[idx], atol=0, rtol=0)


def test_a_checkpoint_with_rows_in_order_still_loads(tiny_ckpt, tmp_path):
    """Quantized checkpoints written before the interleaved layout (no `layout` in their record)."""
    model = quantize(checkpoint.load_model(tiny_ckpt), bits=4)
    checkpoint.save(tmp_path / "q", model, checkpoint.load_tokenizer(tiny_ckpt))
    weights, config = tmp_path / "q" / checkpoint.WEIGHTS_FILE, tmp_path / "q" / checkpoint.CONFIG_FILE
    tensors = load_file(weights)
    for key in [k for k in tensors if k.endswith(".qweight")]:
        tensors[key], tensors[key[:-7] + "scales"] = deinterleave(tensors[key], tensors[key[:-7] + "scales"])
    save_file(tensors, weights)
    record = json.loads(config.read_text())
    del record["quantization"]["layout"]
    config.write_text(json.dumps(record))
    old = checkpoint.load_model(tmp_path / "q")
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), model.state_dict().values()))


def test_q8_blocks_are_llama_cpp_q8_0():
    w = torch.randn(3, 64)
    q, d = quantize_weight(w, 8, 32)
    blocks = w.reshape(3, 2, 32)
    expected_d = blocks.abs().amax(-1) / 127
    torch.testing.assert_close(d, expected_d.half())
    assert q.dtype == torch.int8 and q.abs().max() == 127
    torch.testing.assert_close(q.float(), torch.round(blocks / expected_d[..., None]).reshape(3, 64), atol=1, rtol=0)


def test_int4_packing_is_llama_cpp_q4_0_and_round_trips():
    # a block whose values are exactly representable: the largest magnitude (-8 * d) decides d
    values = torch.tensor([float(v) for v in range(-8, 8)] * 2).reshape(1, 32) * 0.25
    q, d = quantize_weight(values, 4, 32)
    assert q.dtype == torch.uint8 and q.shape == (1, 16) and d.item() == pytest.approx(0.25)
    nibbles = values / 0.25 + 8  # weight j in byte j's low nibble, weight j + 16 in its high nibble
    assert (q[0] & 15).tolist() == nibbles[0, :16].int().tolist()
    assert (q[0] >> 4).tolist() == nibbles[0, 16:].int().tolist()
    torch.testing.assert_close(dequantize_weight(q, d, 4), values, atol=0, rtol=0)


@pytest.mark.parametrize("bits, bound", [(8, 0.01), (4, 0.2)])
def test_quantization_error_is_bounded_per_group(bits, bound):
    w = torch.randn(64, 256)
    q, s = quantize_weight(w, bits, 32)
    assert relative_error(dequantize_weight(q, s, bits), w) < bound


def test_without_kernels_the_quantized_model_gives_the_same_logits(tiny_ckpt, monkeypatch):
    model = quantize(checkpoint.load_model(tiny_ckpt), bits=4)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        last = model(ids, last_only=True)
        monkeypatch.setenv("GPTKIT_NO_KERNELS", "1")
        kernels._library.cache_clear()
        try:
            reference = model(ids, last_only=True)
        finally:
            monkeypatch.delenv("GPTKIT_NO_KERNELS")
            kernels._library.cache_clear()
    assert relative_error(last, reference) < 2e-2


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_checkpoint_saves_and_loads_identical_tensors(tiny_ckpt, tmp_path, bits):
    assert main(["quantize", str(tiny_ckpt), "--bits", str(bits), "--out", str(tmp_path / "q")]) == 0
    saved = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert saved["blocks.0.attn.qkv.qweight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert saved["blocks.0.attn.qkv.scales"].dtype == torch.float16 and saved["wte.qweight"].dtype == torch.int8
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == bits
    model = checkpoint.load_model(tmp_path / "q")
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # nothing floating-point of a weight matrix's size exists after loading
    biggest = max(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert biggest < model.config.n_embd * model.config.vocab_size / 4
    assert isinstance(model.wte, QuantEmbedding) and isinstance(model.blocks[0].mlp.fc, QuantLinear)
    # and the loaded model computes what the freshly quantized one did
    fresh = quantize(checkpoint.load_model(tiny_ckpt), bits=bits)
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), fresh(ids))


def test_the_cli_runs_on_a_quantized_checkpoint(tiny_ckpt, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from gptkit.serve import create_app

    q = tmp_path / "q"
    assert main(["quantize", str(tiny_ckpt), "--bits", "4", "--skip", "lm_head,blocks.1.attn.proj",
                 "--out", str(q)]) == 0
    assert main(["generate", str(q), "--prompt", "The quick", "--max-new-tokens", "5", "--seed", "1"]) == 0
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["eval", str(q), "--task", "ppl", "--data", str(tmp_path / "t.txt")]) == 0
    assert main(["info", str(q)]) == 0
    out = capsys.readouterr().out
    assert "int4, groups of 32" in out and "on disk" in out and "perplexity" in out
    lm = gptkit.load(q)
    with TestClient(create_app(lm, "q")) as client:
        r = client.post("/v1/completions", json={"model": "q", "prompt": "The", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny modern model trained a little on real text (random weights have flat logits: no test at all)."""
    import textwrap

    d = tmp_path_factory.mktemp("trained")
    (d / "t.txt").write_text(open(textwrap.__file__, encoding="utf-8").read() * 3)
    prepare(read_sources(texts=[str(d / "t.txt")]), d / "data", tokenizer="bpe", vocab_size=320)
    train(load_recipe(None, ["block_size=64", "batch_size=16", "lr=3e-3", "eval_interval=100", "warmup_steps=10"],
                      preset="tiny-modern", data=str(d / "data"), out=str(d / "run"), max_steps=150), quiet=True)
    return d


@pytest.mark.parametrize("bits, bound", [(8, 0.005), (4, 0.05)])  # the bounds: +0.5% and +5%
def test_perplexity_of_a_trained_model_rises_little(trained, tmp_path, bits, bound):
    from gptkit import evaluate

    text = (trained / "t.txt").read_text()[:20000]
    base = evaluate.perplexity(gptkit.load(trained / "run").model, gptkit.load(trained / "run").tokenizer, text)
    main(["quantize", str(trained / "run"), "--bits", str(bits), "--out", str(tmp_path / "q")])
    lm = gptkit.load(tmp_path / "q")
    quantized = evaluate.perplexity(lm.model, lm.tokenizer, text)
    assert base["perplexity"] < 100  # it did learn something
    assert quantized["perplexity"] <= base["perplexity"] * (1 + bound)


def test_bad_quantization_requests(tiny_ckpt, tmp_path, capsys):
    def fails(*argv, says):
        assert main(list(argv)) == 1
        assert says in capsys.readouterr().err

    fails("quantize", str(tiny_ckpt), "--bits", "8", "--group-size", "48", "--out", str(tmp_path / "a"),
          says="multiple of 32")
    fails("quantize", str(tiny_ckpt), "--group-size", "96", "--out", str(tmp_path / "a"), says="blocks.0.attn.qkv")
    fails("quantize", str(tiny_ckpt), "--skip", "no_such_layer", "--out", str(tmp_path / "a"), says="no_such_layer")
    assert not (tmp_path / "a").exists()  # nothing written half-way
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny_ckpt), "--bits", "3", "--out", str(tmp_path / "a")])
    with pytest.raises(QuantizeError, match="8 or 4"):
        quantize(checkpoint.load_model(tiny_ckpt), bits=3)

    q = tmp_path / "q"
    main(["quantize", str(tiny_ckpt), "--out", str(q)])
    fails("quantize", str(q), "--out", str(tmp_path / "b"), says="already quantized")
    fails("convert", str(q), "--to-hf", str(tmp_path / "hf"), says="--dequantize")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"text {i}", "label": i % 2}) + "\n"
                                              for i in range(20)))
    fails("finetune", str(q), "--task", "classify", "--train", str(tmp_path / "t.jsonl"), "--out",
          str(tmp_path / "ft"), says="LoRA")

    tensors = load_file(str(q / "model.safetensors"))
    tensors["blocks.1.mlp.fc.scales"][0, 0] = float("nan")
    save_file(tensors, str(q / "model.safetensors"))
    fails("generate", str(q), "--prompt", "x", says="blocks.1.mlp.fc.scales")


def test_dequantized_export_to_transformers(tiny_ckpt, tmp_path):
    pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel

    main(["quantize", str(tiny_ckpt), "--out", str(tmp_path / "q")])
    assert main(["convert", str(tmp_path / "q"), "--to-hf", str(tmp_path / "hf"), "--dequantize"]) == 0
    ours = dequantize(checkpoint.load_model(tmp_path / "q"))  # the quantized values as floats, as exported
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_dtype_is_checked_against_the_hardware(tiny_ckpt, capsys):
    if checkpoint.is_native(torch.bfloat16, torch.device("cpu")):
        lm = gptkit.load(tiny_ckpt, dtype="bf16")
        assert lm.model.dtype == torch.bfloat16 and lm.generate("The", max_new_tokens=3, temperature=0)
    else:
        assert main(["generate", str(tiny_ckpt), "--prompt", "x", "--dtype", "bf16"]) == 1
        assert "emulated" in capsys.readouterr().err
    assert main(["generate", str(tiny_ckpt), "--prompt", "x", "--max-new-tokens", "2", "--dtype", "fp32"]) == 0


def test_a_cast_keeps_the_integers_and_scales(tiny_ckpt):
    model = quantize(checkpoint.load_model(tiny_ckpt), bits=8)
    scales = model.blocks[0].attn.qkv.scales.clone()
    model.to(torch.bfloat16)
    assert model.blocks[0].attn.qkv.qweight.dtype == torch.int8
    assert torch.equal(model.blocks[0].attn.qkv.scales, scales)
    assert model.wte(torch.tensor([[1]])).dtype == torch.bfloat16 and model.dtype == torch.bfloat16


def test_quantizing_twice_is_refused(tiny_ckpt):
    model = quantize(checkpoint.load_model(tiny_ckpt))
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize(model)
    assert isinstance(GPT(preset("tiny-gpt2")).wte, torch.nn.Embedding)

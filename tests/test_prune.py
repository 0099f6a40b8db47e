"""Pruning: exact per-row sparsity, valid N:M masks, Wanda's choice against magnitude's, structured channels that
give the masked model's logits, the record in config.json, and bad requests."""

import json

import pytest
import torch

from gptkit import GPT, checkpoint, preset
from gptkit.cli import main
from gptkit.prune import PruneSpec, block_linears, input_norms, prune, prune_channels, row_mask


def tiny(**changes):
    torch.manual_seed(0)
    return GPT(preset("tiny-gpt2", vocab_size=300, context=64, **changes)).eval()


def batches():
    torch.manual_seed(1)
    return [torch.randint(0, 300, (4, 32)) for _ in range(2)]


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_every_row_loses_exactly_its_share(method):
    model = tiny()
    prune(model, PruneSpec(method, sparsity=0.5), batches())
    for name, layer in block_linears(model).items():
        zeros = (layer.weight == 0).sum(dim=1)
        assert (zeros == layer.weight.shape[1] // 2).all(), name


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_n_m_masks_keep_n_of_every_m(n, m):
    model = tiny()
    masks = prune(model, PruneSpec("magnitude", pattern=(n, m)))
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, m)
        assert (groups.sum(-1) == n).all(), name
        weight = block_linears(model)[name].weight
        assert torch.equal(weight != 0, mask)


def test_wanda_keeps_a_small_weight_on_a_large_activation():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    activation = torch.tensor([100.0, 1.0, 1.0, 1.0])  # the first input is large on every token
    spec = PruneSpec("wanda", sparsity=0.5)
    by_magnitude = row_mask(w.abs(), spec, "x")
    by_wanda = row_mask(w.abs() * activation, spec, "x")
    assert by_magnitude.tolist() == [[False, False, True, True]]
    assert by_wanda.tolist() == [[True, False, False, True]]


def test_wanda_reads_activations_through_the_model():
    a, b = tiny(), tiny()
    with torch.no_grad():  # make one input feature of the first MLP projection dominate
        a.blocks[0].mlp.fc.bias[7] = b.blocks[0].mlp.fc.bias[7] = 50.0
    prune(a, PruneSpec("magnitude", sparsity=0.5))
    prune(b, PruneSpec("wanda", sparsity=0.5), batches())
    wa, wb = a.blocks[0].mlp.proj.weight, b.blocks[0].mlp.proj.weight
    assert (wb[:, 7] != 0).all() and not (wa[:, 7] != 0).all()


def test_wanda_calibrates_each_block_on_what_the_pruned_blocks_before_it_pass_on():
    model, first_only = tiny(), tiny()
    masks = prune(model, PruneSpec("wanda", sparsity=0.5), batches())
    with torch.no_grad():  # block 0 pruned as Wanda pruned it, the rest still dense
        for name in masks:
            if name.startswith("blocks.0."):
                first_only.get_submodule(name).weight.mul_(masks[name])
    norms = input_norms(first_only, batches(), ["blocks.1.mlp.fc"])["blocks.1.mlp.fc"]
    weight = tiny().blocks[1].mlp.fc.weight.abs()
    assert torch.equal(masks["blocks.1.mlp.fc"], row_mask(weight * norms, PruneSpec("wanda", sparsity=0.5), "x"))


@pytest.mark.parametrize("preset_name, changes", [("tiny-gpt2", {}), ("tiny-modern", {})])
def test_channels_give_the_logits_of_the_masked_model(preset_name, changes):
    torch.manual_seed(0)
    big = GPT(preset(preset_name, vocab_size=300, context=64, **changes)).eval()
    small = prune_channels(big, 0.75, batches())
    assert small.config.hidden == round(0.75 * big.config.hidden)
    assert small.num_params() < big.num_params()
    # the same function as the big model with the dropped channels' weights zeroed
    kept_rows = {}
    with torch.no_grad():
        for i, (b, s) in enumerate(zip(big.blocks, small.blocks)):
            proj = b.mlp.proj.weight
            keep = torch.tensor([any(torch.equal(proj[:, j], s.mlp.proj.weight[:, c])
                                     for c in range(s.mlp.proj.weight.shape[1])) for j in range(proj.shape[1])])
            kept_rows[i] = keep
            proj[:, ~keep] = 0
        ids = torch.randint(0, 300, (2, 16))
        torch.testing.assert_close(small(ids), big(ids), atol=1e-5, rtol=1e-5)


def test_prune_cli_writes_a_recorded_checkpoint(tiny_ckpt, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "p"
    assert main(["prune", str(tiny_ckpt), "--method", "wanda", "--pattern", "2:4", "--calib", str(text),
                 "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["pruning"]
    assert record["method"] == "wanda" and record["pattern"] == [2, 4] and record["calibration"] == str(text)
    assert record["sparsity_achieved"] == pytest.approx(0.5)
    model = checkpoint.load_model(out)
    assert model.records.pruning["method"] == "wanda"
    assert main(["generate", str(out), "--prompt", "The", "--max-new-tokens", "3"]) == 0
    assert main(["prune", str(tiny_ckpt), "--method", "channels", "--keep", "0.5", "--out", str(tmp_path / "c")]) == 0
    assert checkpoint.load_config(tmp_path / "c").hidden == checkpoint.load_config(tiny_ckpt).hidden // 2


def test_bad_pruning_requests(tiny_ckpt, tmp_path, capsys, bpe):
    def fails(*argv, says):
        assert main(["prune", str(tiny_ckpt), *argv, "--out", str(tmp_path / "x")]) == 1
        assert says in capsys.readouterr().err
        assert not (tmp_path / "x").exists()

    fails("--method", "magnitude", "--sparsity", "1.5", says="between 0 and 1")
    fails("--method", "magnitude", "--sparsity", "0", says="between 0 and 1")
    fails("--method", "magnitude", says="either --sparsity or --pattern")
    fails("--method", "magnitude", "--pattern", "2:5", says="not a multiple of M = 5")
    fails("--method", "magnitude", "--pattern", "two:four", says="N:M")
    fails("--method", "wanda", "--sparsity", "0.5", says="calibration")
    fails("--method", "channels", says="--keep")

    from gptkit.data import prepare, read_sources

    (tmp_path / "t.txt").write_text("other text entirely " * 500)
    prepare(read_sources(texts=[str(tmp_path / "t.txt")]), tmp_path / "chars", tokenizer="char")
    fails("--method", "wanda", "--sparsity", "0.5", "--calib", str(tmp_path / "chars"), says="different tokenizer")


def test_recovery_training_keeps_the_pruned_weights_zero(tmp_path, cat_data):
    from gptkit.train import load_recipe, train

    common = ["--data", str(cat_data), "block_size=32", "batch_size=4", "warmup_steps=2"]
    assert main(["train", "--preset", "tiny-gpt2", "--out", str(tmp_path / "base"), "--max-steps", "5", *common]) == 0
    assert main(["prune", str(tmp_path / "base"), "--method", "magnitude", "--pattern", "2:4",
                 "--out", str(tmp_path / "pruned")]) == 0
    assert main(["train", "--init", str(tmp_path / "pruned"), "--out", str(tmp_path / "rec"), "--max-steps", "5",
                 *common]) == 0
    pruned, recovered = checkpoint.load_model(tmp_path / "pruned"), checkpoint.load_model(tmp_path / "rec")
    for (name, a), b in zip(block_linears(pruned).items(), block_linears(recovered).values()):
        assert torch.equal(a.weight == 0, b.weight == 0), name  # the same zeros
        assert not torch.equal(a.weight, b.weight), name  # and it did train
    assert recovered.records.pruning["pattern"] == [2, 4]  # the record travels with the weights
    main(["quantize", str(tmp_path / "base"), "--out", str(tmp_path / "int8")])
    with pytest.raises(ValueError, match="quantized"):
        train(load_recipe(None, [f"init={tmp_path / 'int8'}"], data=str(cat_data), out=str(tmp_path / "q"),
                          max_steps=1))


@pytest.mark.parametrize("preset_name", ["tiny-gpt2", "tiny-modern"])  # multi-head; grouped-query (whole groups)
def test_heads_give_the_logits_of_the_masked_model(preset_name):
    from gptkit.prune import prune_heads

    torch.manual_seed(0)
    big = GPT(preset(preset_name, vocab_size=300, context=64)).eval()
    small = prune_heads(big, 0.5, batches())
    c, s = big.config, small.config
    assert s.kv_heads == c.kv_heads // 2 and s.n_head == c.n_head // 2 and s.head_dim == c.head_dim
    assert small.num_params() < big.num_params()
    d = c.head_dim
    with torch.no_grad():
        for b, sb in zip(big.blocks, small.blocks):  # silence the dropped heads: zero their output columns
            proj, kept = b.attn.proj.weight, sb.attn.proj.weight
            for h in range(c.n_head):
                cols = proj[:, h * d:(h + 1) * d]
                if not any(torch.equal(cols, kept[:, k * d:(k + 1) * d]) for k in range(s.n_head)):
                    cols.zero_()
        ids = torch.randint(0, 300, (2, 16))
        torch.testing.assert_close(small(ids), big(ids), atol=1e-5, rtol=1e-5)


def test_a_head_pruned_model_saves_loads_and_generates(tiny_ckpt, tmp_path):
    assert main(["prune", str(tiny_ckpt), "--method", "heads", "--keep", "0.5", "--out", str(tmp_path / "h")]) == 0
    config = checkpoint.load_config(tmp_path / "h")
    assert config.n_head == checkpoint.load_config(tiny_ckpt).n_head // 2 and config.head_size is not None
    assert main(["generate", str(tmp_path / "h"), "--prompt", "The", "--max-new-tokens", "4"]) == 0

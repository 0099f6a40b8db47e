import pytest
import torch

from gptkit import GPT, ConfigError, GPTConfig, preset

# Published parameter counts (GPT-1: 117M; GPT-2 as released, with tied embeddings).
PUBLISHED = {"gpt1": 116_534_784, "gpt2": 124_439_808, "gpt2-medium": 354_823_168,
             "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_counts_match_published(name):
    with torch.device("meta"):
        assert GPT(preset(name)).num_params() == PUBLISHED[name]


def test_gpt3_presets_match_paper_sizes():
    with torch.device("meta"):
        assert round(GPT(preset("gpt3-125m")).num_params() / 1e6) == 125
        assert round(GPT(preset("gpt3-2.7b")).num_params() / 1e9, 1) == 2.7
    assert preset("gpt3-125m").local_layers == tuple(range(1, 12, 2))


def test_config_json_round_trip(tmp_path):
    config = preset("tiny-gpt3")
    config.save(tmp_path / "c.json")
    assert GPTConfig.load(tmp_path / "c.json") == config


@pytest.mark.parametrize("bad", [dict(n_embd=100, n_head=3), dict(n_head=4, n_kv_head=3), dict(dropout=1.5),
                                 dict(local_layers=(1,)), dict(norm="batchnorm"), dict(n_layer=0)])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        GPTConfig(**bad)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("gpt5")
    with pytest.raises(ConfigError, match="unknown config field"):
        preset("gpt2", n_layers=3)
    with pytest.raises(ConfigError, match="unknown config field"):
        GPTConfig.from_dict({"n_layers": 3})


def test_flops_per_token_follows_6n_plus_attention():
    model = GPT(preset("tiny-gpt2", vocab_size=100))
    c = model.config
    n = model.num_params(embeddings=False) + c.vocab_size * c.n_embd
    assert model.flops_per_token(64) == 6 * n + 12 * c.n_layer * c.n_embd * 64

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


def test_one_typed_reader_for_configs_recipes_and_fine_tuning():
    """GPTConfig, a train recipe and fine-tuning settings read their fields' types one way and say so alike."""
    from gptkit.config import field_types, parse_text
    from gptkit.finetune import FinetuneConfig, FinetuneError
    from gptkit.train import TrainConfig
    from gptkit.train.recipe import RecipeError

    for kind, error, int_field, float_field in ((GPTConfig, ConfigError, "n_layer", "dropout"),
                                                (TrainConfig, RecipeError, "batch_size", "lr"),
                                                (FinetuneConfig, FinetuneError, "epochs", "lr")):
        types = field_types(kind)
        with pytest.raises(error, match=f"^{int_field} must be an integer, got 'abc'$"):
            kind(**{int_field: parse_text(types[int_field], "abc")})
        with pytest.raises(error, match=f"^{int_field} must be an integer, got 2.5$"):
            kind(**{int_field: parse_text(types[int_field], "2.5")})
        made = kind(**{int_field: parse_text(types[int_field], "3"), float_field: parse_text(types[float_field], "0" if kind is GPTConfig else "1")})
        assert getattr(made, int_field) == 3 and type(getattr(made, float_field)) is float  # TOML's 1 is exact
    types = field_types(GPTConfig)
    assert parse_text(types["local_layers"], "1,3") == [1, 3] == parse_text(types["local_layers"], "[1, 3]")
    assert parse_text(types["n_kv_head"], "none") is None and parse_text(types["norm"], "rmsnorm") == "rmsnorm"
    assert parse_text(field_types(TrainConfig)["device"], "0") == "0"  # a string field keeps its text
    assert GPTConfig(local_layers=[1], window=4).local_layers == (1,)  # JSON's list: a hashable tuple
    with pytest.raises(ConfigError, match="^norm must be layernorm or rmsnorm, got 'batchnorm'$"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ConfigError, match=r"^n_kv_head must be an integer or null, got '2'$"):
        GPTConfig.from_dict({"n_kv_head": "2"})  # JSON's string is no number: only text is read as one
    with pytest.raises(ConfigError, match="^prenorm must be true or false, got 1$"):
        GPTConfig(prenorm=1)

"""Structured outputs: every reply of a random-weight model parses and validates against its schema (the grammar
library, llguidance, allows only tokens that keep the JSON valid)."""

import json

import jsonschema
import pytest
import torch

import gptkit
from gptkit import GPT, SamplingParams, preset
from gptkit.engine import LM
from gptkit.grammar import GrammarError

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def lm(bpe):
    torch.manual_seed(0)
    return LM(GPT(preset("tiny-modern", vocab_size=bpe.vocab_size, context=256)).eval(), bpe)


def test_every_sampled_reply_is_json_valid_under_its_schema(lm):
    replies = lm.generate(["a", "b c", "{", "name"] * 2, max_new_tokens=120, temperature=1.0, seed=3,
                          json_schema=SCHEMA)
    assert lm.finish_reasons == ["stop"] * 8  # each ended because its JSON was whole
    for text in replies:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_greedy_decoding_under_a_schema(lm):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    text = lm.generate("x", max_new_tokens=100, temperature=0, json_schema=schema)
    assert lm.finish_reasons == ["stop"] and json.loads(text) in ({"ok": True}, {"ok": False})


def test_a_schema_that_does_not_compile_names_the_librarys_reason(lm):
    with pytest.raises(GrammarError, match="does not compile: .*bogus"):
        lm.generate("x", max_new_tokens=5, json_schema={"type": "bogus"})
    with pytest.raises(gptkit.GenerationError, match="json_schema must be a JSON schema"):
        SamplingParams(json_schema=3)


def test_generate_takes_a_json_schema_file(tiny_ckpt, tmp_path, capsys):
    from gptkit.cli import main

    (tmp_path / "s.json").write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                 "required": ["ok"], "additionalProperties": False}))
    assert main(["generate", str(tiny_ckpt), "--prompt", "", "--json-schema", str(tmp_path / "s.json"),
                 "--max-new-tokens", "40", "--temperature", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip()) in ({"ok": True}, {"ok": False})
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["generate", str(tiny_ckpt), "--prompt", "x", "--json-schema", str(tmp_path / "bad.json")]) == 1
    assert "is not a JSON schema" in capsys.readouterr().err


def test_settings_beam_search_would_ignore_are_refused():
    for setting in ({"json_schema": {"type": "object"}}, {"prompt_logprobs": 1}):
        with pytest.raises(gptkit.GenerationError, match="do not combine with beam search"):
            SamplingParams(num_beams=2, **setting)

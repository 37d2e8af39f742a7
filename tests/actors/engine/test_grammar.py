"""Structured outputs on the CPU engine: completions constrained by a JSON schema, a regex or a list of choices are
valid for it and end with it, unconstrained rows of the same steps are untouched, and a constraint that does not
compile is that request's error."""

import json
import re

import pytest

from shardgen.actors.engine.sequence import FINISH_ERROR, FINISH_STOP, Request, SamplingParams
from shardgen.actors.model.loader import load_model
from shardgen.actors.model.tokenizer import load_tokenizer
from tests.helpers import make_engine, model_with_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                                           "size": {"enum": ["S", "M", "L"]}},
          "required": ["name", "ok", "size"], "additionalProperties": False}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    _, path = model_with_tokenizer("llama", tmp_path_factory.mktemp("grammar"))
    tokenizer = load_tokenizer(path)
    return load_model(path), tokenizer


def engine(chat_model, **config):
    loaded, tokenizer = chat_model
    return make_engine(loaded, eos={256}, detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                       tokenizer=tokenizer, **config)


def prompts(tokenizer, *texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def test_constrained_completions_are_valid_and_end_with_their_language(chat_model):
    _, tokenizer = chat_model
    a, b, c = prompts(tokenizer, "Give JSON:", "Pattern:", "Answer:")
    sampled = dict(temperature=1.0, seed=4, max_new_tokens=80, n=4)
    done = engine(chat_model).generate([
        Request("json", a, SamplingParams(json_schema=json.dumps(SCHEMA), **sampled)),
        Request("regex", b, SamplingParams(regex=r"[a-c]{2,4}-[0-9]{2}", **sampled)),
        Request("choice", c, SamplingParams(choice=("yes", "no", "maybe"), **sampled)),
    ])
    texts = {}
    for got in done:
        assert got.finish_reason == FINISH_STOP, got
        texts.setdefault(got.request_id, []).append(tokenizer.decode(got.token_ids, skip_special_tokens=True))
    for text in texts["json"]:
        value = json.loads(text, strict=False)  # xgrammar lets raw control characters into strings
        assert set(value) == {"name", "ok", "size"} and len(value["name"]) <= 6
        assert isinstance(value["ok"], bool) and value["size"] in ("S", "M", "L")
    assert all(re.fullmatch(r"[a-c]{2,4}-[0-9]{2}", t) for t in texts["regex"]), texts["regex"]
    assert all(t in ("yes", "no", "maybe") for t in texts["choice"]), texts["choice"]
    print(texts)
    assert len(set(texts["json"])) > 1  # it sampled, within the schema


def test_unconstrained_rows_sample_as_they_would_without_constrained_ones_beside_them(chat_model):
    _, tokenizer = chat_model
    free = [Request(f"f{i}", p, SamplingParams(max_new_tokens=12, temperature=0.8, seed=i))
            for i, p in enumerate(prompts(tokenizer, "one", "two words", "and three more"))]
    alone = engine(chat_model).generate(free)
    mixed = engine(chat_model).generate(free + [Request("c", prompts(tokenizer, "x")[0],
                                                        SamplingParams(choice=("left", "right"), max_new_tokens=8))])
    assert [c.token_ids for c in mixed[:3]] == [c.token_ids for c in alone]


@pytest.mark.parametrize("params,message", [
    (SamplingParams(json_schema="{not json"), "json_schema: not a valid json schema"),
    (SamplingParams(regex="([a-z"), "regex: not a valid regex"),
])
def test_a_constraint_that_does_not_compile_is_the_requests_error(chat_model, params, message):
    _, tokenizer = chat_model
    (got,) = engine(chat_model).generate([Request("bad", prompts(tokenizer, "x")[0], params)])
    assert got.finish_reason == FINISH_ERROR and got.error.startswith(message), got.error


def test_constraints_that_cannot_go_together_are_named():
    assert SamplingParams(regex="a", choice=("a",)).problems() == [
        "choice cannot be combined with regex: give one structured-output constraint"]
    assert "ignore_eos cannot be combined with json_schema" in SamplingParams(json_schema="{}", ignore_eos=True).problems()[0]
    assert SamplingParams(choice=()).problems() == ["choice must be a non-empty list of non-empty strings, got []"]

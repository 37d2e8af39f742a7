import json

import pyarrow as pa
import pytest

from shardgen.actors.engine.sequence import SEED_MODULUS, SamplingParams
from shardgen.jobs.demo import build_byte_tokenizer
from shardgen.pipeline.stages.tokenize import TokenizeStage, row_seed


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_byte_tokenizer(d)
    return str(d)


def run_stage(stage: TokenizeStage, rows: list[tuple[str, str | None, dict]]) -> list[dict]:
    batch = pa.table({"id": [r[0] for r in rows], "prompt": pa.array([r[1] for r in rows], pa.string()),
                      "row": [json.dumps(r[2]) for r in rows]})
    return stage(batch).to_pylist()


def test_prompts_become_byte_tokens_and_defaults_fill_params(tokenizer_dir):
    out = run_stage(TokenizeStage(tokenizer_dir, False, SamplingParams(max_new_tokens=9)), [("a", "hi!", {})])[0]
    assert out["prompt_token_ids"] == [ord("h"), ord("i"), ord("!")] and out["error"] is None
    assert out["params"]["max_new_tokens"] == 9


@pytest.mark.parametrize(
    "prompt,row,error",
    [
        (None, {}, "prompt: empty or null"),
        ("", {}, "prompt: empty or null"),
        (None, {"prompt_type": "int", "prompt_json": "5"}, "prompt: expected text, got int"),
        ("x", {"max_new_tokens": -3}, "max_new_tokens must be an integer >= 1"),
        ("x", {"max_new_tokens": "ten"}, "max_new_tokens: expected an integer"),
        ("x", {"temperature": -0.5}, "temperature must be >= 0"),
        ("x", {"top_p": 1.5}, "top_p must be in (0, 1]"),
        ("x", {"top_p": 0}, "top_p must be in (0, 1]"),
        (None, {"read_error": "p.jsonl line 3: not a JSON object"}, "p.jsonl line 3: not a JSON object"),
        ("x", {"stop": [1, 2]}, "stop: expected a list of non-empty strings"),
        ("x", {"json_schema": "{oops"}, "json_schema: not JSON"),
        ("x", {"json_schema": 5}, "json_schema: expected a JSON Schema object or its text, got int"),
        ("x", {"choice": "yes"}, "choice: expected a list of strings (in CSV, a JSON list)"),
        ("x", {"choice": []}, "choice: expected a non-empty list of non-empty strings"),
        ("x", {"regex": "a", "choice": ["a"]}, "choice cannot be combined with regex"),
        ("x", {"n": 0}, "n must be an integer in [1, 1024], got 0"),
        ("x", {"repetition_penalty": 0}, "repetition_penalty must be > 0 (1 turns it off), got 0"),
        ("x", {"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2] (0 turns it off), got 2.5"),
        ("x", {"frequency_penalty": "lots"}, "frequency_penalty: expected a number, got 'lots'"),
        ("x", {"min_p": 1.5}, "min_p must be in [0, 1] (0 turns it off), got 1.5"),
        ("x", {"min_tokens": 100}, "min_tokens must be an integer in [0, max_new_tokens (64)], got 100"),
        ("x", {"min_tokens": 2.5}, "min_tokens: expected an integer, got 2.5"),
        ("x", {"stop_token_ids": "[1, -2]"}, "stop_token_ids: expected a list of token ids (integers >= 0)"),
        ("x", {"stop_token_ids": "eos"}, "stop_token_ids: expected a list of token ids, got 'eos'"),
    ],
)
def test_bad_rows_become_error_rows_naming_the_column(tokenizer_dir, prompt, row, error):
    out = run_stage(TokenizeStage(tokenizer_dir, False, SamplingParams()), [("r", prompt, row)])[0]
    assert error in out["error"] and out["prompt_token_ids"] == []


def test_row_overrides_win_and_a_csv_stop_list_is_read_as_json(tokenizer_dir):
    row = {"max_new_tokens": 5.0, "temperature": 0.7, "top_k": 3, "seed": 42, "stop": '["\\n\\n", "END"]',
           "logprobs": "2"}
    out = run_stage(TokenizeStage(tokenizer_dir, False, SamplingParams()), [("r", "x", row)])[0]
    p = out["params"]
    assert (p["max_new_tokens"], p["temperature"], p["top_k"], p["seed"], p["stop"], p["logprobs"]) == (
        5, 0.7, 3, 42, ["\n\n", "END"], 2)
    bad = run_stage(TokenizeStage(tokenizer_dir, False, SamplingParams()), [("r", "x", {"logprobs": 99})])[0]
    assert bad["error"] == "logprobs must be an integer in [0, 20] (0 turns it off), got 99"


@pytest.mark.parametrize("stop,expected", [("\n", ["\n"]), ("not json [", ["not json ["]), ('["a", "b"]', ["a", "b"])])
def test_a_stop_string_is_one_stop_string_and_a_json_list_is_a_list(tokenizer_dir, stop, expected):
    out = run_stage(TokenizeStage(tokenizer_dir, False, SamplingParams()), [("r", "x", {"stop": stop})])[0]
    assert out["error"] is None and out["params"]["stop"] == expected


def test_a_chat_template_file_replaces_the_tokenizers_and_a_system_prompt_goes_where_none_is(tokenizer_dir):
    template = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
    stage = TokenizeStage(tokenizer_dir, True, SamplingParams(), chat_template=template, system_prompt="Be brief.")
    asked = json.dumps([{"role": "user", "content": "hi"}])
    own = json.dumps([{"role": "system", "content": "Be long."}, {"role": "user", "content": "hi"}])
    a, b = run_stage(stage, [("a", asked, {}), ("b", own, {})])
    text = lambda r: bytes(t for t in r["prompt_token_ids"] if t < 256).decode()  # noqa: E731 (specials dropped)
    assert text(a) == "[system:Be brief.][user:hi]" and text(b) == "[system:Be long.][user:hi]"


def test_a_chat_template_that_is_not_jinja_is_refused_naming_its_line(tmp_path):
    from shardgen.pipeline.options import read_chat_template

    (tmp_path / "t.jinja").write_text("{% for m in messages %}\n{{ m['content'] }\n")
    with pytest.raises(ValueError, match=r"`chat_template` .*t.jinja line 2: not a Jinja template"):
        read_chat_template(tmp_path / "t.jinja")


def test_run_seed_gives_each_row_its_own_stable_seed(tokenizer_dir):
    stage = TokenizeStage(tokenizer_dir, False, SamplingParams(temperature=1.0, seed=7))
    a, b = run_stage(stage, [("a", "x", {}), ("b", "x", {})])
    assert a["params"]["seed"] == row_seed(7, "a") % SEED_MODULUS != b["params"]["seed"]


def test_chat_applies_the_template_and_refuses_non_messages(tokenizer_dir):
    stage = TokenizeStage(tokenizer_dir, True, SamplingParams())
    messages = json.dumps([{"role": "user", "content": "hi"}])
    good, bad = run_stage(stage, [("a", messages, {}), ("b", "just text", {})])
    assert good["error"] is None
    assert bytes(t for t in good["prompt_token_ids"] if t < 256).decode() == "hi\n"  # specials around it
    assert "JSON list of {role, content} messages" in bad["error"]


def test_a_rows_own_constraint_replaces_the_runs_and_csv_choices_are_a_json_list(tokenizer_dir):
    stage = TokenizeStage(tokenizer_dir, False, SamplingParams(json_schema='{"type": "object"}'))
    default, regex, choice, obj = run_stage(stage, [("a", "x", {}), ("b", "x", {"regex": "[0-9]+"}),
                                                    ("c", "x", {"choice": '["yes", "no"]'}),
                                                    ("d", "x", {"json_schema": {"type": "integer"}})])
    assert default["params"]["json_schema"] == '{"type": "object"}' and default["params"]["regex"] is None
    assert regex["params"]["regex"] == "[0-9]+" and regex["params"]["json_schema"] is None
    assert choice["params"]["choice"] == ["yes", "no"] and choice["params"]["json_schema"] is None
    assert json.loads(obj["params"]["json_schema"]) == {"type": "integer"} and obj["error"] is None


def test_penalties_min_p_min_tokens_and_stop_token_ids_come_from_the_row_or_the_run(tokenizer_dir):
    run = SamplingParams(repetition_penalty=1.2, min_p=0.05, stop_token_ids=(7,))
    row = {"presence_penalty": "0.5", "frequency_penalty": -1, "min_tokens": "3", "stop_token_ids": "[10, 11]"}
    p = run_stage(TokenizeStage(tokenizer_dir, False, run), [("r", "x", row), ("s", "y", {"stop_token_ids": 4})])
    assert [x["error"] for x in p] == [None, None]
    a, b = p[0]["params"], p[1]["params"]
    assert (a["repetition_penalty"], a["presence_penalty"], a["frequency_penalty"], a["min_p"], a["min_tokens"],
            a["stop_token_ids"]) == (1.2, 0.5, -1.0, 0.05, 3, [10, 11])
    assert b["stop_token_ids"] == [4] and b["min_tokens"] == 0 and b["presence_penalty"] == 0.0


def test_the_inputs_carried_columns_pass_through_with_their_types(tokenizer_dir):
    batch = pa.table({"id": ["a", "b"], "prompt": ["x", None], "row": ["{}", "{}"],
                      "topic": pa.array([7, None], pa.int8())})
    out = TokenizeStage(tokenizer_dir, False, SamplingParams())(batch)
    assert out.schema.field("topic").type == pa.int8() and out.column("topic").to_pylist() == [7, None]

"""OpenAI Batch API request lines as input rows: the body's fields under shardgen's names, chat requests marked for
the chat template, and every line that is not a request shardgen can answer an error row naming its field."""

import json

import pytest

from shardgen.pipeline.stages import read
from shardgen.pipeline.stages.openai_batch import request_row

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_a_chat_request_maps_its_sampling_fields_and_is_marked_for_the_chat_template():
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_completion_tokens": 9, "temperature": 0.5,
            "top_p": 0.9, "n": 2, "stop": "END", "seed": 3, "logprobs": True, "top_logprobs": 4,
            "frequency_penalty": 0.5, "presence_penalty": -1, "user": "u1", "response_format": {"type": "text"},
            "logit_bias": {}}
    prompt, row = request_row("POST", CHAT, body)
    assert json.loads(prompt) == MESSAGES
    assert row == {"chat": True, "max_new_tokens": 9, "temperature": 0.5, "top_p": 0.9, "n": 2, "stop": "END",
                   "seed": 3, "logprobs": 4, "frequency_penalty": 0.5, "presence_penalty": -1}


@pytest.mark.parametrize("body,logprobs", [({"logprobs": 2}, 2), ({"logprobs": 0}, 1), ({"logprobs": None}, None)])
def test_a_completions_request_takes_its_prompt_and_logprobs(body, logprobs):
    prompt, row = request_row("POST", TEXT, {"prompt": ["Once"], "max_tokens": 4, **body})
    assert prompt == "Once" and row.get("max_new_tokens") == 4 and row.get("logprobs") == logprobs


@pytest.mark.parametrize("method,url,body,message", [
    ("GET", TEXT, {"prompt": "x"}, "method: expected POST, got 'GET'"),
    ("POST", "/v1/embeddings", {"input": "x"}, "url: shardgen answers /v1/chat/completions and /v1/completions"),
    ("POST", TEXT, "x", "body: expected a JSON object, got str"),
    ("POST", CHAT, {"messages": []}, "body.messages: expected a non-empty list of {role, content} messages"),
    ("POST", CHAT, {"messages": [{"content": "no role"}]}, "body.messages: expected a non-empty list"),
    ("POST", TEXT, {"prompt": ["a", "b"]}, "body.prompt: expected one non-empty string"),
    ("POST", TEXT, {"prompt": "x", "max_tokens": 3, "max_completion_tokens": 4}, "give max_tokens or max_completion"),
    ("POST", TEXT, {"prompt": "x", "logit_bias": {"50256": -100}}, "body.logit_bias: shardgen does not run "
                                                                    "logit_bias (got {'50256': -100}); leave it out"),
    ("POST", CHAT, {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {}}},
     'body.response_format: expected {"type": "text"}'),
    ("POST", CHAT, {"messages": MESSAGES, "tools": [{"type": "function"}]}, "body.tools: shardgen does not run"),
    ("POST", CHAT, {"messages": MESSAGES, "top_logprobs": 2}, "body.top_logprobs: needs logprobs: true"),
    ("POST", CHAT, {"messages": MESSAGES, "logprobs": 3}, "body.logprobs: expected true or false, got 3"),
])
def test_a_request_shardgen_cannot_answer_as_asked_is_refused_naming_the_field(method, url, body, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        request_row(method, url, body)


def test_a_json_response_format_becomes_the_rows_json_schema():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}
    _, row = request_row("POST", CHAT, {"messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}})
    assert json.loads(row["json_schema"]) == schema
    _, row = request_row("POST", CHAT, {"messages": MESSAGES, "response_format": {"type": "json_object"}})
    assert json.loads(row["json_schema"]) == {"type": "object"}


def test_a_batch_file_reads_as_one_row_a_line_and_a_bad_line_is_an_error_row_naming_it(tmp_path):
    lines = [
        {"custom_id": "a", "method": "POST", "url": CHAT, "body": {"messages": MESSAGES, "max_tokens": 5}},
        "this is not JSON",
        {"custom_id": "c", "method": "POST", "url": TEXT, "body": {"prompt": "Once", "n": 3}},
        {"method": "POST", "url": TEXT, "body": {"prompt": "no id"}},
        {"custom_id": 7, "method": "POST", "url": TEXT, "body": {"prompt": "x", "logit_bias": {"50": 10}}},
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    assert read.check_inputs([path], "prompt", None, "openai-batch") == "custom_id"
    table = next(read.read_file(path, "batch.jsonl", "prompt", "custom_id", "openai-batch")).to_pylist()
    rows = [json.loads(r["row"]) for r in table]
    assert [r["id"] for r in table] == ["a", "batch.jsonl:1", "c", "batch.jsonl:3", "7"]
    assert rows[0] == {"chat": True, "max_new_tokens": "5"} and json.loads(table[0]["prompt"]) == MESSAGES
    assert rows[2] == {"n": "3"} and table[2]["prompt"] == "Once"  # numbers as written, typed by tokenize
    assert rows[1][read.READ_ERROR].startswith("batch.jsonl line 2: not a JSON object")
    assert rows[3][read.READ_ERROR] == "batch.jsonl request 4: custom_id: missing; give every request a custom_id"
    assert "request '7': body.logit_bias: shardgen does not run logit_bias" in rows[4][read.READ_ERROR]


def test_an_input_that_is_not_an_openai_batch_file_is_refused_before_any_worker_starts(tmp_path):
    (tmp_path / "p.csv").write_text("id,prompt\na,b\n")
    with pytest.raises(ValueError, match=r"an OpenAI batch input is JSON Lines \(.jsonl\)"):
        read.check_inputs([tmp_path / "p.csv"], "prompt", None, "openai-batch")
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "b"}\n')
    with pytest.raises(ValueError, match="line 1 is not an OpenAI batch request"):
        read.check_inputs([tmp_path / "p.jsonl"], "prompt", None, "openai-batch")

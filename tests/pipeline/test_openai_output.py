"""The OpenAI batch output file: one line per request, bodies that the openai package's own types accept, a row's
n samples as its choices, logprobs with the token text, and refused requests as error lines."""

import json

import pyarrow as pa
from openai.types import Completion
from openai.types.chat import ChatCompletion

from shardgen.pipeline.openai_output import write_batch_output
from shardgen.pipeline.output_dir import OPENAI_BATCH_OUTPUT
from shardgen.pipeline.stages.write import write_part
from shardgen.pipeline.storage import Location
from tests.helpers import output_block

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


def test_the_output_file_has_a_valid_response_per_request_and_an_error_line_per_refused_one(demo, tmp_path):
    model, _ = demo
    requests = [{"custom_id": "0", "url": CHAT, "body": {"model": "m-chat", "messages": [], "logprobs": True,
                                                          "top_logprobs": 1}},
                {"custom_id": "1", "url": TEXT, "body": {"prompt": "x", "n": 2, "logprobs": 0}},
                {"custom_id": "2", "url": TEXT, "body": {"prompt": "y"}}]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in requests))
    out = tmp_path / "out"
    out.mkdir()
    good = output_block(2, samples=2).take([0, 2, 3])  # id 0 sample 0, id 1 samples 0 and 1
    top = [[{"token_id": 72, "logprob": -0.1}, {"token_id": 73, "logprob": -2.5}]] * 2
    good = good.set_column(good.schema.get_field_index("logprobs"), "logprobs",
                           pa.array([[-0.1, -0.2]] * 3, pa.list_(pa.float32())))
    good = good.set_column(good.schema.get_field_index("top_logprobs"), "top_logprobs",
                           pa.array([top] * 3, good.schema.field("top_logprobs").type))
    write_part(out, good, {})
    bad = output_block(1, "error")
    write_part(out, bad.set_column(0, "id", pa.array(["2"])), {})
    assert write_batch_output(Location.of(out), [Location.of(batch)], model) == 3
    lines = {line["custom_id"]: line for line in map(json.loads, (out / OPENAI_BATCH_OUTPUT).read_text().splitlines())}
    assert set(lines) == {"0", "1", "2"}
    chat = ChatCompletion.model_validate(lines["0"]["response"]["body"])
    assert lines["0"]["response"]["status_code"] == 200 and lines["0"]["error"] is None
    assert chat.model == "m-chat" and chat.choices[0].message.content == "c" and chat.usage.total_tokens == 3 + 2
    content = chat.choices[0].logprobs.content
    assert [round(t.logprob, 5) for t in content] == [-0.1, -0.2]
    assert all([(a.token, round(a.logprob, 5)) for a in t.top_logprobs] == [("h", -0.1)] for t in content)  # top 1
    text = Completion.model_validate(lines["1"]["response"]["body"])
    assert text.model == model.name and [c.index for c in text.choices] == [0, 1]
    assert text.usage.prompt_tokens == 3 and text.usage.completion_tokens == 4  # the prompt counts once
    assert text.choices[0].logprobs.top_logprobs == [{}, {}]  # logprobs 0: the chosen tokens' alone
    assert lines["2"]["response"] is None and lines["2"]["error"]["message"] == "prompt: empty"

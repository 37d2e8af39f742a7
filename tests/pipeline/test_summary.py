"""A run's summary counts this run's part files only, and names the layouts its replicas reported."""

import pyarrow as pa

from shardgen.pipeline.columns import TOP_LOGPROBS
from shardgen.pipeline.stages.write import existing_output, write_part
from shardgen.pipeline.storage import Location
from shardgen.pipeline.summary import summarise


def rows(n: int, reason: str = "length") -> pa.Table:
    return pa.table({"id": [str(i) for i in range(n)], "prompt": ["p"] * n, "completion": ["c"] * n,
                     "completion_token_ids": pa.array([[1]] * n, pa.list_(pa.int32())), "prompt_tokens": [4] * n,
                     "completion_tokens": [1] * n, "finish_reason": [reason] * n,
                     "error": pa.array([None] * n, pa.string()), "logprobs": pa.array([None] * n, pa.list_(pa.float32())),
                     "top_logprobs": pa.array([None] * n, TOP_LOGPROBS),
                     "prompt_logprobs": pa.array([None] * n, pa.list_(pa.float32())), "layout": ["int4-tiled"] * n})


def test_rows_of_an_earlier_run_are_not_this_runs_and_the_layouts_are_the_replicas(tmp_path):
    write_part(tmp_path, rows(5), {})
    before = existing_output(tmp_path)
    write_part(tmp_path, rows(3), {})
    write_part(tmp_path, rows(2, "error"), {})
    s = summarise(Location.of(tmp_path), before, 2.0, "cuda", ["int4-preshuffled", "int4-preshuffled"], resumed=5)
    assert (s.rows, s.errors, s.files, s.prompt_tokens, s.generated_tokens) == (5, 2, 2, 12, 5)
    assert s.layout == "int4-preshuffled" and s.resumed == 5
    assert "5 rows (2 errors)" in s.lines()[0] and "5 rows were there already" in s.lines()[0]


def test_a_run_that_wrote_nothing_says_so():
    s = summarise(Location.of("/nonexistent-shardgen-out"), [], 1.0, "cpu", [], resumed=0)
    assert s.rows == 0 and s.layout == "nothing written"


def test_prompt_tokens_from_the_prefix_cache_are_counted_in_the_summary(tmp_path):
    before = existing_output(tmp_path)
    write_part(tmp_path, rows(10), {})
    s = summarise(Location.of(tmp_path), before, 1.0, "cpu", ["cpu-dequantized"], resumed=0, cached_prompt_tokens=32)
    assert "40 prompt (32, 80%, from the prefix cache)" in s.lines()[1]
    assert "from the prefix cache" not in summarise(Location.of(tmp_path), before, 1.0, "cpu", [], 0).lines()[1]

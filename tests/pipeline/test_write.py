"""What a part file counts for the summary and the progress line."""

import pyarrow as pa

from shardgen.pipeline.write import stats_of


def test_an_error_rows_prompt_tokens_do_not_count_toward_throughput():
    table = pa.table({"finish_reason": ["length", "error", "stop"], "prompt_tokens": pa.array([10, 5_000_000, 7], pa.int32()),
                      "completion_tokens": pa.array([4, 0, 2], pa.int32())})
    s = stats_of(table)
    assert (s.rows, s.errors, s.prompt_tokens, s.completion_tokens, s.files) == (3, 1, 17, 6, 1)

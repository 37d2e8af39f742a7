"""Part files: written whole under a name of their own, in the output schema, with the run's metadata; and what a
part file counts for the summary and the progress line."""

import pyarrow as pa
import pyarrow.parquet as pq

from shardgen.pipeline.columns import OUTPUT_SCHEMA
from shardgen.pipeline.stages.write import (ParquetSink, existing_output, part_name, read_stats, rows_in, run_metadata,
                                            stats_of, write_part)
from shardgen.pipeline.storage import Location
from tests.helpers import output_block as rows


def test_a_part_file_has_the_output_schema_the_runs_metadata_and_the_layout_that_wrote_it(tmp_path):
    stats = write_part(tmp_path, rows(3), run_metadata(tp=2, model="m", sampling={"seed": 1}))
    (part,) = existing_output(tmp_path)
    assert part.name.startswith("part-") and part.name.endswith(".parquet")
    table = pq.read_table(part.open())
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    meta = table.schema.metadata
    assert meta[b"shardgen.tp"] == b"2" and meta[b"shardgen.model"] == b"m" and meta[b"shardgen.sampling"] == b'{"seed": 1}'
    assert meta[b"shardgen.hardware_layout"] == b"int4-dual"
    assert (stats.rows, stats.prompt_tokens, stats.completion_tokens) == (3, 9, 6) == (
        read_stats(part).rows, read_stats(part).prompt_tokens, read_stats(part).completion_tokens)


def test_each_block_is_a_file_of_its_own_and_an_empty_block_writes_nothing(tmp_path):
    write_part(tmp_path, rows(2), {})
    write_part(tmp_path, rows(5), {})
    write_part(tmp_path, rows(0), {})
    (tmp_path / "notes.txt").write_text("not a part file")
    parts = existing_output(tmp_path)
    assert len(parts) == 2 and rows_in(parts) == 7
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written through a temporary name


def test_a_block_written_again_replaces_its_own_file_and_never_doubles_its_rows(tmp_path):
    # Ray runs a write task again when its node is lost after the task wrote but before it reported: the second
    # write must land on the first's file (a lost-node CI run once wrote one block's 8 rows twice)
    sink = ParquetSink(Location.of(tmp_path), {})
    sink.write([rows(3)], None)
    sink.write([rows(3)], None)
    assert len(existing_output(tmp_path)) == 1 and rows_in(existing_output(tmp_path)) == 3
    assert part_name(rows(3)) != part_name(rows(2)) != part_name(rows(2, samples=2))  # other rows, other files


def test_an_error_rows_prompt_tokens_do_not_count_toward_throughput():
    table = pa.table({"finish_reason": ["length", "error", "stop"], "prompt_tokens": pa.array([10, 5_000_000, 7], pa.int32()),
                      "completion_tokens": pa.array([4, 0, 2], pa.int32())})
    s = stats_of(table)
    assert (s.rows, s.errors, s.prompt_tokens, s.completion_tokens, s.files) == (3, 1, 17, 6, 1)


def test_a_rows_n_samples_count_its_prompt_once_and_a_part_file_without_sample_index_one_row_per_input():
    s = stats_of(rows(2, samples=4))
    assert (s.rows, s.inputs, s.prompt_tokens, s.completion_tokens) == (8, 2, 6, 16)
    old = rows(3).drop_columns(["sample_index"])  # written before sample_index existed
    assert (stats_of(old).rows, stats_of(old).inputs, stats_of(old).prompt_tokens) == (3, 3, 9)


def test_the_inputs_carried_columns_follow_the_output_columns_with_their_types(tmp_path):
    block = rows(2).append_column("score", pa.array([1.5, None], pa.float32()))
    write_part(tmp_path, block, {})
    table = pq.read_table(next(tmp_path.glob("part-*.parquet")))
    assert table.schema.names == [*OUTPUT_SCHEMA.names, "score"]
    assert table.schema.field("score").type == pa.float32() and table.column("score").to_pylist() == [1.5, None]

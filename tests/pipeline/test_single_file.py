"""``single_file``: every row of the part files, in input order, in one Parquet file."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardgen.pipeline.single_file import check_single_file, write_single_file
from shardgen.pipeline.stages.write import run_metadata, write_part
from shardgen.pipeline.storage import Location
from tests.helpers import output_block


def test_the_rows_of_every_part_file_come_out_in_input_order_with_samples_in_order(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "b.jsonl").write_text('{"prompt": "x"}\nnot json\n')
    (inputs / "a.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    want = ["a.jsonl:0", "a.jsonl:1", "a.jsonl:2", "b.jsonl:0", "b.jsonl:1"]
    # part files as a run leaves them: any order across and within files, a row's samples apart
    block = output_block(5, samples=2)
    block = block.set_column(0, "id", pa.array([want[int(i)] for i in block.column("id").to_pylist()]))
    out = Location.of(tmp_path / "out")
    out.make_dir()
    meta = run_metadata(model="m")
    for rows in ([9, 2, 5], [0, 7], [3, 8, 1], [6, 4]):
        write_part(out, block.take(rows), meta)
    files = [Location.of(inputs / "a.jsonl"), Location.of(inputs / "b.jsonl")]
    n = write_single_file(tmp_path / "all.parquet", out, files, Location.of(inputs), "prompt", None, "auto")
    table = pq.read_table(tmp_path / "all.parquet")
    assert n == table.num_rows == 10
    assert list(zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist())) == [
        (i, k) for i in want for k in (0, 1)]
    assert table.schema.metadata[b"shardgen.model"] == b"m"  # the run's metadata, as in every part file


@pytest.mark.parametrize("where,message", [
    ("out/all.parquet", "is inside `output`"), ("in/all.parquet", "is inside the input"),
    ("all.csv", "name a .parquet file")])
def test_a_single_file_inside_the_output_or_the_input_or_not_parquet_is_refused(tmp_path, where, message):
    with pytest.raises(ValueError, match=message):
        check_single_file(tmp_path / where, tmp_path / "out", tmp_path / "in")

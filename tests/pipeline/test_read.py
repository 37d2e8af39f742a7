"""Counting an input's rows cheaply (to size batches): Parquet footers, text lines, and when not to count."""

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import read


def test_rows_are_counted_from_parquet_footers_and_text_lines(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y"}\n\n')
    (tmp_path / "c.csv").write_text("prompt\nhello\nworld\n")
    assert read.count_rows(read.input_files(tmp_path)) == 3 + 2 + 2


def test_text_inputs_too_big_to_count_cheaply_are_not_counted(tmp_path, monkeypatch):
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n' * 10)
    monkeypatch.setattr(read, "COUNT_TEXT_BYTES", 20)
    assert read.count_rows(read.input_files(tmp_path)) is None


def test_a_file_that_cannot_be_counted_leaves_the_batch_size_to_the_default(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    assert read.count_rows([tmp_path / "broken.parquet"]) is None

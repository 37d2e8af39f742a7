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


def test_an_empty_cell_in_any_per_row_column_takes_the_runs_default(tmp_path):
    import json

    import pyarrow.csv as pcsv

    from pipeline.read import OVERRIDE_COLUMNS, _normalize

    header = "id,prompt," + ",".join(OVERRIDE_COLUMNS)
    (tmp_path / "p.csv").write_text(f'{header}\na,hello,,,,,,\nb,world,7,0.5,0.9,3,11,"[""x""]"\nc,again, ,,,,,  \n')
    rows = _normalize(pcsv.read_csv(tmp_path / "p.csv"), "prompt", "id", None).column("row").to_pylist()
    assert json.loads(rows[0]) == {} and json.loads(rows[2]) == {}  # empty, or blank (a text column then)
    assert json.loads(rows[1])["stop"] == '["x"]' and json.loads(rows[1])["top_k"] == 3


def test_every_per_row_column_of_a_csv_with_empty_cells_gives_the_default_or_its_value(tmp_path):
    """Through the tokenize stage: the row with empty cells gets the run's defaults; a number in a column that CSV
    read as text (it also holds a blank) is that number."""
    import json

    import pyarrow.csv as pcsv

    from actors.sequence import SamplingParams
    from pipeline.read import OVERRIDE_COLUMNS, _normalize
    from pipeline.tokenize import TokenizeStage
    from tests.helpers import model_with_tokenizer

    header = "id,prompt," + ",".join(OVERRIDE_COLUMNS)
    (tmp_path / "p.csv").write_text(f'{header}\na,hello,,,,,,\nb,world,7,0.5,0.9,3,11,"[""x""]"\nc,again, ,,,,,  \n')
    table = _normalize(pcsv.read_csv(tmp_path / "p.csv"), "prompt", "id", None)
    _, model_dir = model_with_tokenizer("llama", tmp_path / "m")
    defaults = SamplingParams(max_new_tokens=5, stop=("END",))
    out = TokenizeStage(str(model_dir), False, defaults)(table)
    assert out.column("error").to_pylist() == [None, None, None]
    params = [SamplingParams.from_json(p) for p in out.column("params").to_pylist()]
    assert params[0] == params[2] == defaults
    assert params[1] == SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11, stop=("x",))

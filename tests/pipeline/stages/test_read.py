"""Reading prompt files: ids and prompts exactly as written, per-row columns for the tokenize stage, unreadable lines
as error rows, which files may be run together, and counting an input's rows cheaply (to size batches)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardgen.pipeline.columns import params_list
from shardgen.pipeline.stages import read


def rows_of(path, prompt_column="prompt", id_column="id") -> list[dict]:
    return [r for t in read.read_file(path, path.name, prompt_column, id_column) for r in t.to_pylist()]


def test_rows_are_counted_from_parquet_footers_and_text_lines(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y"}\n\n')
    (tmp_path / "c.csv").write_text("prompt\nhello\nworld\n")
    assert read.count_rows(read.input_files(tmp_path)) == 3 + 2 + 2


def test_csv_rows_are_counted_as_records_when_a_quoted_cell_spans_lines(tmp_path):
    (tmp_path / "m.csv").write_text('id,prompt\na,"line one\nline two\nline three"\nb,"x\ny"\n')
    assert read.count_rows([tmp_path / "m.csv"]) == 2


def test_text_inputs_too_big_to_count_cheaply_are_not_counted(tmp_path, monkeypatch):
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n' * 10)
    monkeypatch.setattr(read, "COUNT_TEXT_BYTES", 20)
    assert read.count_rows(read.input_files(tmp_path)) is None


def test_a_file_that_cannot_be_counted_leaves_the_batch_size_to_the_default(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    assert read.count_rows([tmp_path / "broken.parquet"]) is None


EMPTY = "," * len(read.OVERRIDE_COLUMNS)  # a row's per-row cells, all empty
# a value for each of read.OVERRIDE_COLUMNS, in order (json_schema and regex left empty)
VALUES = '7,0.5,0.9,3,11,"[""x""]",2,3,,,"[""p"", ""q""]",1.1,0.5,-0.5,0.1,2,"[5, 6]"'


def test_an_empty_cell_in_any_per_row_column_takes_the_runs_default(tmp_path):
    header = "id,prompt," + ",".join(read.OVERRIDE_COLUMNS)
    (tmp_path / "p.csv").write_text(f'{header}\na,hello{EMPTY}\nb,world,{VALUES}\nc,again, {EMPTY[:-1]}  \n')
    rows = [json.loads(r["row"]) for r in rows_of(tmp_path / "p.csv")]
    assert rows[0] == {} and rows[2] == {}  # empty, or blank (CSV has no null for text)
    assert rows[1]["stop"] == '["x"]' and rows[1]["top_k"] == "3"  # typed by the tokenize stage


def test_every_per_row_column_of_a_csv_with_empty_cells_gives_the_default_or_its_value(tmp_path):
    """Through the tokenize stage: the row with empty cells gets the run's defaults; every other cell, read as
    text, becomes its column's type."""
    from shardgen.actors.engine.sequence import SamplingParams
    from shardgen.pipeline.stages.tokenize import TokenizeStage
    from tests.helpers import model_with_tokenizer

    header = "id,prompt," + ",".join(read.OVERRIDE_COLUMNS)
    (tmp_path / "p.csv").write_text(f'{header}\na,hello{EMPTY}\nb,world,{VALUES}\nc,again, {EMPTY[:-1]}  \n')
    table = pa.concat_tables(read.read_file(tmp_path / "p.csv", "p.csv", "prompt", "id"))
    _, model_dir = model_with_tokenizer("llama", tmp_path / "m")
    defaults = SamplingParams(max_new_tokens=5, stop=("END",))
    out = TokenizeStage(str(model_dir), False, defaults)(table)
    assert out.column("error").to_pylist() == [None, None, None]
    params = params_list(out.column("params"))
    assert params[0] == params[2] == defaults
    assert params[1] == SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11, stop=("x",),
                                       logprobs=2, n=3, choice=("p", "q"), repetition_penalty=1.1,
                                       presence_penalty=0.5, frequency_penalty=-0.5, min_p=0.1, min_tokens=2,
                                       stop_token_ids=(5, 6))


def test_csv_ids_and_prompts_are_read_exactly_as_written_and_a_byte_order_mark_is_stripped(tmp_path):
    (tmp_path / "excel.csv").write_bytes("\ufeffid,prompt\n007,NA\n0009,123\n7,  padded  \n".encode())
    assert read.check_inputs([tmp_path / "excel.csv"], "prompt", None) == "id"  # not "\ufeffid"
    rows = rows_of(tmp_path / "excel.csv")
    assert [(r["id"], r["prompt"]) for r in rows] == [("007", "NA"), ("0009", "123"), ("7", "  padded  ")]
    assert list(read.iter_ids(tmp_path / "excel.csv", "id")) == [["007", "0009", "7"]]  # what the id check sees


def test_json_numbers_keep_their_digits_as_ids_and_a_number_prompt_is_an_error_row(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"id": 1e3, "prompt": "a", "temperature": 0.50}\n{"id": 12345678901234567890, '
                                      '"prompt": 5}\n{"id": "x", "prompt": [{"role": "user", "content": "hi"}]}\n')
    rows = rows_of(tmp_path / "p.jsonl")
    assert [r["id"] for r in rows] == ["1e3", "12345678901234567890", "x"]
    assert json.loads(rows[0]["row"]) == {"temperature": "0.50"}
    assert json.loads(rows[1]["row"])["prompt_type"] == "number" and rows[1]["prompt"] is None
    assert json.loads(json.loads(rows[2]["row"])["prompt_json"]) == [{"role": "user", "content": "hi"}]


def test_parquet_ids_of_any_type_become_their_text(tmp_path):
    pq.write_table(pa.table({"id": pa.array([7, 8], pa.int64()), "prompt": ["a", "b"]}), tmp_path / "p.parquet")
    assert [r["id"] for r in rows_of(tmp_path / "p.parquet")] == ["7", "8"]


def test_a_jsonl_line_that_is_not_an_object_is_an_error_row_naming_its_line_and_the_rest_are_read(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(b'{"id": "a", "prompt": "x"}\n\n{not json\n[1, 2]\n\xff\xfe\n'
                                       b'{"id": "b", "prompt": "y"}\n')
    rows = rows_of(tmp_path / "p.jsonl")
    assert [r["id"] for r in rows] == ["a", "p.jsonl:1", "p.jsonl:2", "p.jsonl:3", "b"]
    errors = [json.loads(r["row"]).get(read.READ_ERROR) for r in rows]
    assert errors[0] is None and errors[4] is None
    assert errors[1].startswith("p.jsonl line 3: not a JSON object")  # blank line 2 is not a row
    assert errors[2] == "p.jsonl line 4: not a JSON object (a list)" and errors[3].startswith("p.jsonl line 5")
    assert list(read.iter_ids(tmp_path / "p.jsonl", "id")) == [["a", "b"]]  # named by place, unique by construction


@pytest.mark.parametrize("contents,id_column,expected", [
    ({"a.jsonl": '{"id": "1", "prompt": "x"}\n', "b.csv": "id,prompt\n2,y\n"}, None, "id"),
    ({"a.jsonl": '{"prompt": "x"}\n', "b.csv": "prompt\ny\n"}, None, None),
    ({"a.jsonl": '{"key": "1", "prompt": "x"}\n', "b.csv": "key,prompt\n2,y\n", "c.jsonl": ""}, "key", "key"),
])
def test_the_id_column_is_in_every_file_with_rows_or_in_none(tmp_path, contents, id_column, expected):
    for name, text in contents.items():
        (tmp_path / name).write_text(text)
    assert read.check_inputs(read.input_files(tmp_path), "prompt", id_column) == expected


def test_the_inputs_other_columns_are_carried_parquet_with_its_types_text_formats_as_text(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"], "score": pa.array([3], pa.int16()), "tags": [["x", "y"]]}),
                   tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"prompt": "b", "score": 4, "extra": {"k": [1, 2.50]}, "n": 2}\n'
                                      '{"prompt": "c", "extra": "plain"}\n')
    files = read.input_files(tmp_path)
    with pytest.raises(ValueError, match=r"column 'score' is int16 in .*a.parquet and string in .*b.jsonl"):
        read.carried_columns(files, "prompt", None)
    (tmp_path / "a.parquet").unlink()
    files = read.input_files(tmp_path)
    carried = read.carried_columns(files, "prompt", None)
    assert carried == {"score": pa.string(), "extra": pa.string()}  # n is read as the row's own samples
    rows = [r for t in read.read_file(files[0], "b.jsonl", "prompt", None, carried=carried) for r in t.to_pylist()]
    assert [(r["score"], r["extra"]) for r in rows] == [("4", '{"k": [1, 2.5]}'), (None, "plain")]
    pq.write_table(pa.table({"prompt": ["a"], "tags": [["x", "y"]]}), tmp_path / "c.parquet")
    carried = read.carried_columns([tmp_path / "c.parquet"], "prompt", None)
    assert carried == {"tags": pa.list_(pa.string())}
    (row,) = [r for t in read.read_file(tmp_path / "c.parquet", "c", "prompt", None, carried=carried)
              for r in t.to_pylist()]
    assert row["tags"] == ["x", "y"]


@pytest.mark.parametrize("column", ["completion", "error", "layout", "params"])
def test_an_input_column_named_as_one_shardgen_writes_is_refused_naming_it(tmp_path, column):
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "x", column: "mine"}) + "\n")
    with pytest.raises(ValueError, match=rf"has a column '{column}', the name of a column shardgen writes; rename"):
        read.carried_columns([tmp_path / "a.jsonl"], "prompt", None)

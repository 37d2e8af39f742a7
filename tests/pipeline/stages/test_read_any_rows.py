"""Any rows the reader may meet, in every input format (hypothesis): every record yields exactly one row out of the
read and tokenize stages, in the file's order, and a row that cannot run names its line, record or column. A file is
never failed by one of its rows."""

import csv
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardgen.actors.engine.sequence import SamplingParams
from shardgen.jobs.demo import build_byte_tokenizer
from shardgen.pipeline.stages import read
from shardgen.pipeline.stages.tokenize import TokenizeStage

COLUMNS = ["prompt", "id", *read.OVERRIDE_COLUMNS, "other"]
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "\x00", "1e3", "[1, 2]", '{"a": 1}', "\n", "é"]))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False), TEXT)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))
ROWS = st.lists(st.dictionaries(st.sampled_from(COLUMNS), VALUES, max_size=6), min_size=1, max_size=8)
# what a line of a text file may be instead of a record: not JSON, not UTF-8, a NUL, a record of the wrong width
BROKEN = st.sampled_from([b"not json", b"\xff\xfe bad bytes", b"\x00", b"a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q,r,s,t,u,v"])
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    build_byte_tokenizer(directory)
    return TokenizeStage(str(directory), False, SamplingParams())


def through(path, stage, id_column=None) -> list[dict]:
    """The rows of one file after the read and tokenize stages."""
    return [r for t in read.read_file(path, path.name, "prompt", id_column) for r in stage(t).to_pylist()]


def named(row: dict) -> bool:
    """An error that says where: a line, a record, or a column (a per-row setting or the prompt)."""
    return bool(re.search(r"line \d+|record with|column '|^prompt|^id|" + "|".join(COLUMNS), row["error"]))


@SETTINGS
@given(rows=ROWS, broken=st.lists(st.tuples(st.integers(0, 8), BROKEN), max_size=3))
def test_every_jsonl_line_is_one_row_and_a_broken_line_is_an_error_naming_it(tmp_path_factory, stage, rows, broken):
    lines = [json.dumps(r).encode() for r in rows]
    for at, line in broken:
        lines.insert(min(at, len(lines)), line)
    path = tmp_path_factory.mktemp("jsonl") / "p.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = through(path, stage)
    assert len(out) == len(lines)
    assert [r["id"] for r in out] == [f"p.jsonl:{i}" for i in range(len(lines))]  # in order, named by place
    for line, row in zip(lines, out):
        if line in [b for _, b in broken]:
            assert row["error"] and row["error"].startswith("p.jsonl line "), row
        elif row["error"]:
            assert named(row), row


@SETTINGS
@given(rows=ROWS, broken=st.lists(st.tuples(st.integers(0, 8), BROKEN), max_size=3))
def test_every_csv_record_is_one_row_and_a_broken_record_is_an_error_naming_it(tmp_path_factory, stage, rows, broken):
    columns = sorted({k for r in rows for k in r} | {"prompt"})

    def record(values: list[str]) -> bytes:
        text = io.StringIO()
        csv.writer(text).writerow(values)  # its \r\n line ends: a cell holding \r or \n is quoted
        return text.getvalue().encode()  # a cell with a newline is quoted: one record over several lines

    records = [record(["" if r.get(c) is None else r[c] if isinstance(r[c], str) else json.dumps(r[c])
                       for c in columns]) for r in rows]
    for at, line in broken:
        records.insert(min(at, len(records)), line + b"\n")
    path = tmp_path_factory.mktemp("csv") / "p.csv"
    path.write_bytes(record(columns) + b"".join(records))
    out = through(path, stage)
    assert len(out) == len(records)
    assert all(named(r) for r in out if r["error"]), [r["error"] for r in out if r["error"]]


@SETTINGS
@given(rows=ROWS, types=st.dictionaries(st.sampled_from(COLUMNS), st.sampled_from(
    [pa.string(), pa.int64(), pa.float64(), pa.bool_(), pa.list_(pa.string())]), max_size=4))
def test_every_parquet_row_is_one_row_whatever_its_columns_types(tmp_path_factory, stage, rows, types):
    def cell(value, type_):
        try:
            return pa.array([value], type_)[0].as_py()
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            return None

    table = pa.table({c: pa.array([cell(r.get(c), t) for r in rows], t) for c, t in types.items()}
                     if types else {"prompt": pa.array([None] * len(rows), pa.string())})
    path = tmp_path_factory.mktemp("parquet") / "p.parquet"
    pq.write_table(table, path)
    out = through(path, stage)
    assert len(out) == len(rows)
    assert all(named(r) for r in out if r["error"]), [r["error"] for r in out if r["error"]]

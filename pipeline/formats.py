"""The input file formats: which format a file is (by its extension), and its rows as chunks of Python values.

Each reader streams one file in chunks of ``(columns, errors)``: the wanted columns as Python values, and per row
what made it unreadable (None for a good row), so one bad line is one error row and the file's other rows go on.
The read stage (stages/read.py) and the OpenAI batch output (openai_output.py) read through them.
"""

from __future__ import annotations

import io
import json
from typing import Iterator

from shardgen.pipeline.storage import Location

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv"}


def format_of(file: Location) -> str:
    """"parquet", "json" (JSON Lines) or "csv", by the file's extension (input_files refuses any other)."""
    return FORMATS[file.suffix.lower()]


def iter_chunks(file: Location, wanted: list[str], chunk_rows: int = 8192
                ) -> Iterator[tuple[dict[str, list], list[str | None]]]:
    """``(columns, errors)`` chunks of one file: the ``wanted`` columns as Python values (text in CSV, JSON numbers
    as written, Parquet's own types; a column the file lacks is absent or all null), and per row what made it
    unreadable (None for a good row)."""
    fmt = format_of(file)
    if fmt == "parquet":
        pf = parquet_file(file)
        present = [c for c in wanted if c in pf.schema_arrow.names]
        for b in pf.iter_batches(batch_size=chunk_rows, columns=present):
            yield {c: b.column(c).to_pylist() for c in present}, [None] * b.num_rows
    elif fmt == "csv":
        yield from csv_chunks(file, wanted)
    else:
        yield from json_chunks(file, wanted, chunk_rows)


def csv_chunks(file: Location, wanted: list[str], chunk_rows: int = 8192
                ) -> Iterator[tuple[dict[str, list], list[str | None]]]:
    """The wanted columns as text, a record at a time (CSV has no types, and inferring them turns the id ``007``
    into 7; a wanted column the file lacks is all null). A record with more or fewer fields than the header, or a
    wanted cell that is not UTF-8, is an error row naming its line and the column; the file's other records go on.
    Blank lines are not records. (Python's csv reader, not Arrow's: Arrow's fails the whole file on a record of
    the wrong width that is not UTF-8 either, and does not know a record's line.)"""
    import csv

    columns: dict[str, list] = {c: [] for c in wanted}
    errors: list[str | None] = []
    with io.TextIOWrapper(file.open_stream(), encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        records = csv.reader(f)
        try:
            header = next(records, None) or []
            index = {}
            for i, name in enumerate(header):
                index.setdefault(name, i)
            where = [index.get(c) for c in wanted]
            for record in records:
                if not record:
                    continue
                values, error = _csv_record(record, len(header), where, wanted, records.line_num)
                for c, v in zip(wanted, values):
                    columns[c].append(v)
                errors.append(error)
                if len(errors) == chunk_rows:
                    yield columns, errors
                    columns, errors = {c: [] for c in wanted}, []
        except csv.Error as e:
            raise ValueError(f"cannot read {file} as csv (line {records.line_num}: {e}); check the file") from e
    if errors:
        yield columns, errors


def _csv_record(record: list[str], width: int, where: list[int | None], wanted: list[str],
                line: int) -> tuple[list[str | None], str | None]:
    """One record's wanted cells, or what is wrong with it (then every cell is null)."""
    if len(record) != width:
        return [None] * len(wanted), f"line {line}: a record of {len(record)} fields where the header has {width}"
    values = [record[i] if i is not None else None for i in where]
    for c, v in zip(wanted, values):
        try:
            v is not None and v.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes, kept as surrogates by the reader
            return [None] * len(wanted), f"line {line}: column {c!r} is not UTF-8 text"
    return values, None


class JsonNumber(str):
    """A JSON number kept as written (``1e3`` stays ``1e3``): an id is its text; a number column is converted by the
    tokenize stage; a prompt that is a number is an error row."""


def json_chunks(file: Location, wanted: list[str], chunk_rows: int) -> Iterator[tuple[dict[str, list], list]]:
    """JSON Lines, a line at a time: a line that is not a JSON object is an error row naming its line, and the
    file's other rows go on. Blank lines are not rows."""
    columns: dict[str, list] = {c: [] for c in wanted}
    errors: list[str | None] = []
    with file.open_stream() as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            record, error = _json_record(raw, number)
            for c in wanted:
                columns[c].append(record.get(c))
            errors.append(error)
            if len(errors) == chunk_rows:
                yield columns, errors
                columns, errors = {c: [] for c in wanted}, []
    if errors:
        yield columns, errors


def _json_record(raw: bytes, number: int) -> tuple[dict, str | None]:
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        record = json.loads(line, parse_int=JsonNumber, parse_float=JsonNumber)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both are
        return {}, f"line {number}: not a JSON object ({e})"
    if not isinstance(record, dict):
        return {}, f"line {number}: not a JSON object (a {type(record).__name__})"
    return record, None


def parquet_file(file: Location):
    """A Parquet file opened for its footer and row groups (read lazily)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(file.open())

"""Read stage: prompts from Parquet, JSONL or CSV (a file or a directory of them) into Ray Data.

Writes the columns ``id`` (string), ``prompt`` (string or null) and ``row``
(JSON: the row's per-row overrides and anything wrong with it), so every block
has one schema whatever the files held.

Every file is read by shardgen's own reader, one Ray task a file, streaming in
chunks. The id and prompt columns are read as text exactly as written (a CSV id
``007`` stays ``007``, a JSON number keeps its digits), and the per-row columns
as text too, for the tokenize stage to give their declared types (a cell it
cannot read becomes that row's error, not the file's). Without an id column,
each row's id is ``<file relative to --input>:<row>``, stable across runs.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from shardgen.pipeline.formats import (FORMATS, JsonNumber, csv_chunks, format_of, iter_chunks, json_chunks,
                                       parquet_file)
from shardgen.pipeline.storage import Location, Where

OVERRIDE_COLUMNS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs", "n", "json_schema",
                    "regex", "choice", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p",
                    "min_tokens", "stop_token_ids")
DEFAULT_ID_COLUMN = "id"
READ_ERROR = "read_error"  # a key of ``row``: what made the row unreadable (the tokenize stage reports it)
READS: tuple[str, ...] = ()
WRITES = ("id", "prompt", "row")


def input_files(where: Where) -> list[Location]:
    """The prompt files under ``where`` (a file, or a directory searched recursively; names starting with ``.`` or
    ``_`` are left out, as Spark's and Ray's markers are), sorted."""
    path = Location.of(where)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [f for f in path.files(recursive=True)
                 if not any(part.startswith((".", "_")) for part in f.relative_to(path).split("/"))]
        if not files:
            raise ValueError(f"`input` {path} is an empty directory; put .parquet, .jsonl or .csv files in it")
    else:
        raise FileNotFoundError(f"`input` {path} does not exist")
    unknown = [p.name for p in files if p.suffix.lower() not in FORMATS]
    if unknown:
        raise ValueError(f"`input` holds files of unknown type ({', '.join(unknown[:5])}); shardgen reads "
                         f"{', '.join(sorted(FORMATS))}")
    return files


@dataclass(frozen=True)
class FileSchema:
    """What a cheap look at one input file tells: its columns and whether it holds any row."""

    columns: list[str]
    has_rows: bool


def peek(file: Location) -> FileSchema:
    """Columns and emptiness of one input file: the Parquet footer, the CSV header and first record, or the first
    JSONL record."""
    fmt = format_of(file)
    try:
        if fmt == "parquet":
            meta = parquet_file(file).metadata
            return FileSchema(list(meta.schema.to_arrow_schema().names), meta.num_rows > 0)
        # utf-8-sig: Excel starts its CSVs with a byte-order mark
        with io.TextIOWrapper(file.open_stream(), encoding="utf-8-sig", newline="") as f:
            if fmt == "csv":
                import csv

                records = csv.reader(f)
                header = next(records, [])
                return FileSchema(header, any(any(cell.strip() for cell in r) for r in records))
            first = next((line for line in f if line.strip()), "")
    except (OSError, UnicodeDecodeError, pa.ArrowException) as e:
        raise ValueError(f"cannot read {file} as {fmt} ({e}); check the file") from e
    if not first:
        return FileSchema([], False)
    if first.lstrip().startswith("["):
        raise ValueError(f"{file} holds a JSON array; shardgen reads JSON Lines (one object per line): write each "
                         f"row as its own line, e.g. with `jq -c '.[]' {file.name} > {Path(file.name).stem}.jsonl`")
    try:
        record = json.loads(first)
    except ValueError as e:
        raise ValueError(f"cannot read {file} as json (line 1: {e}); check the file") from e
    if not isinstance(record, dict):
        raise ValueError(f"cannot read {file} as json (line 1 is not a JSON object); write one object per line")
    return FileSchema(list(record), True)


def check_inputs(files: list[Where], prompt_column: str, id_column: str | None,
                 input_format: str = "auto") -> str | None:
    """Look at every input file before any worker starts; returns the id column to read (None: ids are
    ``<file>:<row>``).

    Refuses an input without rows, a file with rows that lacks the prompt column, and ids that only some files
    have: ``id_column`` None takes ``id`` when every file has it; a named id column must be in every file. An
    OpenAI batch input must be JSON Lines whose first line is a request (``custom_id`` and ``body``)."""
    files = [Location.of(f) for f in files]
    if input_format == "openai-batch":
        from shardgen.pipeline.stages import openai_batch

        for f in files:
            if format_of(f) != "json":
                raise ValueError(f"{f}: an OpenAI batch input is JSON Lines (.jsonl); `input_format` openai-batch "
                                 f"does not read {f.suffix} files")
    schemas = {f.path: peek(f) for f in files}
    with_rows = [f for f in files if schemas[f.path].has_rows]
    if not with_rows:
        where = files[0] if len(files) == 1 else f"{str(files[0]).rsplit('/', 1)[0]} ({len(files)} files)"
        raise ValueError(f"`input` {where} has no rows; give prompts, one row each")
    if input_format == "openai-batch":
        for f in with_rows:
            if not {openai_batch.ID_FIELD, "body"} <= set(schemas[f.path].columns):
                raise ValueError(f"{f}: line 1 is not an OpenAI batch request (fields found: "
                                 f"{schemas[f.path].columns}; a request has custom_id, method, url and body)")
        return openai_batch.ID_FIELD
    for f in with_rows:
        if prompt_column not in schemas[f.path].columns:
            raise ValueError(f"{f} has no column {prompt_column!r} (columns found: {schemas[f.path].columns}); "
                             f"pass `prompt_column` with one of them")
    wanted = id_column or DEFAULT_ID_COLUMN
    lacking = [f for f in with_rows if wanted not in schemas[f.path].columns]
    if id_column is None and len(lacking) == len(with_rows):
        return None
    if lacking:
        having = len(with_rows) - len(lacking)
        named = ", ".join(str(f) for f in lacking[:3]) + (f" and {len(lacking) - 3} more" if len(lacking) > 3 else "")
        found = f"columns found: {schemas[lacking[0].path].columns}"
        if not having:
            raise ValueError(f"`id_column` {wanted!r} is not in {named} ({found}); pass `id_column` with one of "
                             f"them, or leave it out for <file>:<row> ids")
        raise ValueError(f"the id column {wanted!r} is missing from {named} ({found}) but {having} other file(s) "
                         f"have it; either every input file has the id column or none does: add it to them, or pass "
                         f"`id_column` with a column every file has")
    return wanted


def carried_columns(files: list[Where], prompt_column: str, id_column: str | None,
                    input_format: str = "auto") -> dict[str, pa.DataType]:
    """The input columns shardgen does not read, each with the type it keeps in the output: a Parquet column its
    own Arrow type, a CSV or JSONL column text (those formats carry no types; a JSON value that is not a string is
    kept as its JSON text). A column with an output column's name, or of two types in two files, is refused."""
    from shardgen.pipeline.columns import RESERVED

    if input_format == "openai-batch":
        return {}
    consumed = {prompt_column, *OVERRIDE_COLUMNS, id_column or DEFAULT_ID_COLUMN}
    types: dict[str, pa.DataType] = {}
    first: dict[str, Location] = {}
    for f in map(Location.of, files):
        for name, type_ in _column_types(f):
            if name in consumed:
                continue
            if name in RESERVED:
                raise ValueError(f"{f} has a column {name!r}, the name of a column shardgen writes; rename it in the "
                                 f"input (the input's other columns are carried into the output beside shardgen's)")
            if name in types and types[name] != type_:
                raise ValueError(f"column {name!r} is {types[name]} in {first[name]} and {type_} in {f}; give it one "
                                 f"type in every input file (it is carried into the output as it is)")
            types.setdefault(name, type_)
            first.setdefault(name, f)
    return types


def _column_types(file: Location) -> list[tuple[str, pa.DataType]]:
    if format_of(file) == "parquet":
        return [(field.name, field.type) for field in parquet_file(file).schema_arrow]
    return [(name, pa.string()) for name in peek(file).columns]


def estimate_rows(files: list[Location]) -> int:
    """Rows in the input: exact for Parquet (from the footers), an upper bound for text files."""
    return sum(parquet_file(f).metadata.num_rows if format_of(f) == "parquet" else f.size() // 16 for f in files)


COUNT_TEXT_BYTES = 64 * 2**20  # text inputs up to this size have their rows counted (a fraction of a second)


def count_rows(files: list[Where]) -> int | None:
    """Rows in the input where cheap to know: Parquet from its footers, JSONL by its lines and CSV by its records
    (a quoted cell may span lines) while the text files total at most ``COUNT_TEXT_BYTES``; None for bigger text
    inputs (for sizing batches and the progress line, not for checks)."""
    files = [Location.of(f) for f in files]
    text = [f for f in files if format_of(f) != "parquet"]
    if sum(f.size() for f in text) > COUNT_TEXT_BYTES:
        return None
    try:
        rows = sum(parquet_file(f).metadata.num_rows for f in files if f not in text)
        for f in text:
            if format_of(f) == "csv":
                # a column no file has: converts nothing, but has a row per record
                rows += sum(len(errors) for _, errors in csv_chunks(f, ["\0count"]))
            else:
                with f.open_stream() as fh:
                    rows += sum(1 for line in fh if line.strip())
    except (OSError, ValueError, pa.ArrowException):  # the read stage names what is wrong with it
        return None
    return rows


def read_prompts(files: list[Location], root: Location, prompt_column: str, id_column: str | None,
                 input_format: str = "auto", carried: dict[str, pa.DataType] | None = None):
    """A Ray Dataset of (id, prompt, row) and the ``carried`` columns (``carried_columns``) for every row of every
    input file: one read task a file, streaming. ``root``: the directory the files are named relative to (ids
    without an id column are ``<name>:<row>``)."""
    import ray.data

    items = [{"name": f.relative_to(root)} for f in files]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_files, batch_format="pyarrow", batch_size=1,
        fn_kwargs={"root": root, "prompt_column": prompt_column, "id_column": id_column, "input_format": input_format,
                   "carried": carried or {}})


def _read_files(batch: pa.Table, root: Location, prompt_column: str, id_column: str | None,
                input_format: str, carried: dict[str, pa.DataType]) -> Iterator[pa.Table]:
    for name in batch.column("name").to_pylist():
        yield from read_file(root.child(name), name, prompt_column, id_column, input_format, carried)


def read_file(file: Where, name: str, prompt_column: str, id_column: str | None,
              input_format: str = "auto", carried: dict[str, pa.DataType] | None = None) -> Iterator[pa.Table]:
    """One input file as (id, prompt, row) tables and the ``carried`` columns, in order."""
    file = Location.of(file)
    start = 0
    if input_format == "openai-batch":
        from shardgen.pipeline.stages import openai_batch

        for columns, errors in json_chunks(file, list(openai_batch.FIELDS), 8192):
            table = openai_batch.normalize(columns, errors, (name, start))
            start += table.num_rows
            yield table
        return
    carried = carried or {}
    wanted = [prompt_column, *OVERRIDE_COLUMNS] + ([id_column] if id_column else []) + list(carried)
    for columns, errors in iter_chunks(file, wanted):
        table = normalize_rows(columns, errors, format_of(file), prompt_column, id_column, (name, start))
        for column, type_ in carried.items():
            values = columns.get(column) or [None] * table.num_rows
            table = table.append_column(pa.field(column, type_), pa.array(
                [_text(v) for v in values] if pa.types.is_string(type_) else values, type_))
        start += table.num_rows
        yield table


def iter_ids(file: Where, id_column: str) -> Iterator[list[str | None]]:
    """The ids of one input file in chunks, exactly as the pipeline reads them (None where missing). Unreadable
    lines are left out: their rows are named by their place, unique by construction."""
    for columns, errors in iter_chunks(Location.of(file), [id_column]):
        yield [_id_text(v) for v, err in zip(columns[id_column], errors) if not err]


def normalize_rows(columns: dict[str, list], errors: list[str | None], fmt: str, prompt_column: str,
                   id_column: str | None, positions: tuple[str, int]) -> pa.Table:
    """A chunk of rows as (id, prompt, row): the prompt as text (or chat messages, or what is wrong with it, in
    ``row``), the per-row settings as ``row``'s JSON, the id as text or ``<positions[0]>:<row number>``."""
    ids, prompts, rows = [], [], []
    overrides = [c for c in OVERRIDE_COLUMNS if c in columns]
    prompt_values = columns.get(prompt_column) or [None] * len(errors)
    id_values = columns.get(id_column) if id_column else None
    for i, prompt in enumerate(prompt_values):
        row_id = _id_text(id_values[i]) if id_values is not None else None
        ids.append(row_id if row_id is not None or id_column else f"{positions[0]}:{positions[1] + i}")
        if errors[i]:
            if ids[-1] is None:  # an unreadable line has no id of its own: name it by its place
                ids[-1] = f"{positions[0]}:{positions[1] + i}"
            prompts.append(None)
            rows.append(json.dumps({READ_ERROR: f"{positions[0]} {errors[i]}"}))
            continue
        row = {c: columns[c][i] for c in overrides if not _unset(columns[c][i], c, fmt)}
        if isinstance(row.get("json_schema"), (dict, list)):  # a schema written as an object: its text, numbers kept
            row["json_schema"] = json.dumps(plain_json(row["json_schema"]))
        if isinstance(prompt, str) and not isinstance(prompt, JsonNumber) or prompt is None:
            prompts.append(prompt)
        else:
            # Chat messages arrive as lists of records; anything else is reported by the tokenize stage.
            row["prompt_json"] = json.dumps(prompt, default=str)
            row["prompt_type"] = "number" if isinstance(prompt, JsonNumber) else type(prompt).__name__
            prompts.append(None)
        rows.append(json.dumps(row, default=str))
    return pa.table({"id": pa.array(ids, pa.string()), "prompt": pa.array(prompts, pa.string()),
                     "row": pa.array(rows, pa.string())})


def _text(value: object) -> str | None:
    """A carried value of a text column: text as it is (a JSON number as written), anything else as its JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(plain_json(value), default=str)


def plain_json(value: object) -> object:
    """A parsed JSON value with its numbers as numbers again (``JsonNumber`` keeps them as their text)."""
    if isinstance(value, JsonNumber):
        return json.loads(value)
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_json(v) for v in value]
    return value


def _unset(value: object, column: str, fmt: str) -> bool:
    """A null or an empty cell: the row takes the run's default for that column. A blank cell too in CSV, which has
    no null for text, and in number columns; elsewhere a blank stop (``"\\n"``) is a stop string."""
    if value is None or value == "":
        return True
    return isinstance(value, str) and not value.strip() and (fmt == "csv" or column != "stop")


def _id_text(value: object) -> str | None:
    """An id as text; None for a missing or empty one."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    return None if value is None or value == "" else str(value)

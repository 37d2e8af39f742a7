"""Read stage: prompts from Parquet, JSONL or CSV (a file or a directory of them) into Ray Data.

Writes the columns ``id`` (string), ``prompt`` (string or null) and ``row``
(JSON: the row's per-row overrides and anything wrong with its prompt), so
every block has one schema whatever the files held.

With an id column, Ray Data's own readers read the files in parallel. Without
one, each file is read in order so the id ``<file>:<row>`` is stable across runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv"}
OVERRIDE_COLUMNS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
READS: tuple[str, ...] = ()
WRITES = ("id", "prompt", "row")


def input_files(path: Path) -> list[Path]:
    """The prompt files under ``path`` (a file, or a directory searched recursively), sorted."""
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
        if not files:
            raise ValueError(f"--input {path} is an empty directory; put .parquet, .jsonl or .csv files in it")
    unknown = [p.name for p in files if p.suffix.lower() not in FORMATS]
    if unknown:
        raise ValueError(f"--input holds files of unknown type ({', '.join(unknown[:5])}); shardgen reads "
                         f"{', '.join(sorted(FORMATS))}")
    return files


def peek_columns(file: Path) -> list[str]:
    """Column names of one input file, read cheaply (schema or first record only)."""
    fmt = FORMATS[file.suffix.lower()]
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(file).names)
        with open(file, encoding="utf-8") as f:
            first = f.readline()
        if not first.strip():
            return []
        if fmt == "csv":
            import csv

            return next(csv.reader([first]))
        record = json.loads(first)
        return list(record) if isinstance(record, dict) else []
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"cannot read {file} as {fmt} ({e}); check the file") from e


def check_columns(files: list[Path], prompt_column: str) -> list[str]:
    """The first file's columns, after checking the prompt column is among them (before any cluster starts)."""
    columns = peek_columns(files[0])
    if prompt_column not in columns:
        raise ValueError(f"{files[0]} has no column {prompt_column!r} (columns found: {columns}); "
                         f"pass --prompt-column with one of them")
    return columns


def estimate_rows(files: list[Path]) -> int:
    """Rows in the input: exact for Parquet (from the footers), an upper bound for text files."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows if FORMATS[f.suffix.lower()] == "parquet" else f.stat().st_size // 16
               for f in files)


COUNT_TEXT_BYTES = 64 * 2**20  # text inputs up to this size have their lines counted (a fraction of a second)


def count_rows(files: list[Path]) -> int | None:
    """Rows in the input where cheap to know: Parquet from its footers, JSONL/CSV by their lines while the text
    files total at most ``COUNT_TEXT_BYTES``; None for bigger text inputs (for sizing batches, not for checks)."""
    import pyarrow.parquet as pq

    text = [f for f in files if FORMATS[f.suffix.lower()] != "parquet"]
    if sum(f.stat().st_size for f in text) > COUNT_TEXT_BYTES:
        return None
    try:
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files if f not in text)
        for f in text:
            with open(f, "rb") as fh:
                lines = sum(1 for line in fh if line.strip())
            rows += max(0, lines - 1) if FORMATS[f.suffix.lower()] == "csv" else lines  # a CSV's header
    except (OSError, pa.ArrowException):  # a file the read stage will name, with what is wrong with it
        return None
    return rows


def read_prompts(path: Path, prompt_column: str, id_column: str):
    """A Ray Dataset of (id, prompt, row) for every row of every input file."""
    import ray.data

    files = input_files(path)
    columns = check_columns(files, prompt_column)
    root = path if path.is_dir() else path.parent
    has_ids = id_column in columns
    if has_ids:
        by_format: dict[str, list[str]] = {}
        for f in files:
            by_format.setdefault(FORMATS[f.suffix.lower()], []).append(str(f))
        readers = {"parquet": ray.data.read_parquet, "json": ray.data.read_json, "csv": ray.data.read_csv}
        parts = [readers[fmt](paths) for fmt, paths in by_format.items()]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        ds = ds.map_batches(_normalize, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"prompt_column": prompt_column, "id_column": id_column, "positions": None})
    else:
        items = [{"file": str(f), "name": str(f.relative_to(root))} for f in files]
        ds = ray.data.from_items(items).map_batches(
            _read_files_in_order, batch_format="pyarrow", batch_size=1,
            fn_kwargs={"prompt_column": prompt_column})
    return ds


def _read_files_in_order(batch: pa.Table, prompt_column: str) -> Iterator[pa.Table]:
    for file, name in zip(batch.column("file").to_pylist(), batch.column("name").to_pylist()):
        start = 0
        for table in _iter_file(Path(file)):
            yield _normalize(table, prompt_column, None, positions=(name, start))
            start += table.num_rows


def check_id_column(files: list[Path], id_column: str) -> None:
    """With ids in the first file, every file needs the id column (each file's schema or first record)."""
    for file in files[1:]:
        columns = peek_columns(file)
        if id_column not in columns:
            raise ValueError(f"{file} has no id column {id_column!r} (columns found: {columns}); every input file "
                             f"needs it, or pass --id-column with a column they all have")


def iter_ids(file: Path, id_column: str) -> Iterator[list[str | None]]:
    """The ids of one input file in chunks, as the pipeline reads them (text; None where missing). The file must have
    the column (``check_id_column``)."""
    if FORMATS[file.suffix.lower()] == "parquet":
        import pyarrow.parquet as pq

        for b in pq.ParquetFile(file).iter_batches(batch_size=65536, columns=[id_column]):
            yield [_id_text(v) for v in b.column(0).to_pylist()]
        return
    for table in _iter_file(file):  # check_id_column saw the column in the file's first record
        yield [_id_text(v) for v in table.column(id_column).to_pylist()]


def _iter_file(file: Path, chunk_rows: int = 8192) -> Iterator[pa.Table]:
    fmt = FORMATS[file.suffix.lower()]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for b in pq.ParquetFile(file).iter_batches(batch_size=chunk_rows):
            yield pa.Table.from_batches([b])
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        for b in pcsv.open_csv(file):
            yield pa.Table.from_batches([b])
    else:
        import pyarrow.json as pjson

        table = pjson.read_json(file)
        for offset in range(0, table.num_rows, chunk_rows):
            yield table.slice(offset, chunk_rows)


def _normalize(table: pa.Table, prompt_column: str, id_column: str | None, positions: tuple[str, int] | None) -> pa.Table:
    ids, prompts, rows = [], [], []
    names = set(table.column_names)
    overrides = [c for c in OVERRIDE_COLUMNS if c in names]
    prompt_values = table.column(prompt_column).to_pylist()
    id_values = table.column(id_column).to_pylist() if id_column else None
    override_values = {c: table.column(c).to_pylist() for c in overrides}
    for i, prompt in enumerate(prompt_values):
        ids.append(f"{positions[0]}:{positions[1] + i}" if id_values is None else _id_text(id_values[i]))
        row = {c: override_values[c][i] for c in overrides if not _unset(override_values[c][i])}
        if isinstance(prompt, str) or prompt is None:
            prompts.append(prompt)
        else:
            # Chat messages arrive as lists of records; anything else is reported by the tokenize stage.
            row["prompt_json"] = json.dumps(prompt, default=str)
            row["prompt_type"] = type(prompt).__name__
            prompts.append(None)
        rows.append(json.dumps(row, default=str))
    return pa.table({"id": pa.array(ids, pa.string()), "prompt": pa.array(prompts, pa.string()),
                     "row": pa.array(rows, pa.string())})


def _unset(value: object) -> bool:
    """A null or an empty cell (CSV has no null for text): the row takes the run's default for that column."""
    return value is None or (isinstance(value, str) and not value.strip())


def _id_text(value: object) -> str | None:
    return None if value is None else str(value)

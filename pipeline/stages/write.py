"""Write stage: the output schema, and a Ray Data sink that writes Parquet files atomically with run metadata."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import Datasink

from shardgen.pipeline.columns import output_table
from shardgen.pipeline.output_dir import PART_PREFIX, is_part_file
from shardgen.pipeline.storage import Location, Where

READS = ("id", "sample_index", "prompt", "completion", "completion_token_ids", "prompt_tokens", "completion_tokens",
         "finish_reason", "error", "logprobs", "top_logprobs", "prompt_logprobs", "layout")


@dataclass
class WriteStats:
    rows: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    files: int = 0
    inputs: int = 0  # the input rows those rows answer: n samples of a row, or its error row, count once

    def add(self, other: "WriteStats") -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def existing_output(output: Where) -> list[Location]:
    """The finished part files in ``output`` (none if it does not exist)."""
    return [f for f in Location.of(output).files() if is_part_file(f.name)]


class ParquetSink(Datasink[WriteStats]):
    """Each write task writes its blocks with ``write_part``. (The run's summary counts the files, not these
    tasks' returns: the generate stage writes rows too.)"""

    def __init__(self, output: Location, metadata: dict[str, str]) -> None:
        self.output = output
        self.metadata = metadata

    def on_write_start(self, schema: object = None) -> None:
        self.output.make_dir()

    def write(self, blocks: Iterable[pa.Table], ctx: object) -> WriteStats:
        stats = WriteStats()
        for block in blocks:
            stats.add(write_part(self.output, block, self.metadata))
        return stats


def write_part(output: Where, block: pa.Table, metadata: dict[str, str]) -> WriteStats:
    """Write one block of finished rows as ``part-<digest>.parquet``, whole or not at all (``Location.write_bytes``),
    so a part file in the output is always complete (the generate stage's early flushes write this way too).

    The name is a digest of the block's rows (``part_name``): a write task that Ray runs again (its node was lost
    after it wrote, before it reported) writes the same file again, not a second copy of its rows."""
    if block.num_rows == 0:
        return WriteStats()
    layouts = sorted(set(block.column("layout").to_pylist()))
    table = output_table(block)
    meta = {**metadata, "shardgen.hardware_layout": ",".join(layouts)}
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    Location.of(output).child(part_name(table)).write_bytes(buffer.getvalue())
    return stats_of(table)


def part_name(table: pa.Table) -> str:
    """``part-<digest of the rows' (id, sample_index)>.parquet``: the same rows always get the same name, and two
    writes of different rows never meet (each output row is one (id, sample_index) of one write)."""
    h = hashlib.blake2b(digest_size=16)
    samples = (table.column("sample_index").to_pylist() if "sample_index" in table.column_names
               else [None] * table.num_rows)
    for i, s in zip(table.column("id").to_pylist(), samples):
        h.update(json.dumps([i, s]).encode())  # one JSON array a row: no two rows' bytes run together
    return f"{PART_PREFIX}{h.hexdigest()}.parquet"


def stats_of(table: pa.Table) -> WriteStats:
    """Rows, error rows, input rows and tokens of a table of output rows, as one file. An error row's prompt was not
    run: its tokens do not count toward throughput; the n samples of a row computed its prompt once, so it counts
    once. (Part files written before ``sample_index`` existed hold one row per input row.)"""
    finish = table.column("finish_reason").to_pylist()
    prompt = table.column("prompt_tokens").to_pylist()
    samples = (table.column("sample_index").to_pylist() if "sample_index" in table.column_names
               else [None] * table.num_rows)
    first = [s is None or s == 0 for s in samples]
    return WriteStats(rows=table.num_rows, errors=sum(r == "error" for r in finish),
                      prompt_tokens=sum(n or 0 for n, r, f in zip(prompt, finish, first) if r != "error" and f),
                      completion_tokens=sum(v or 0 for v in table.column("completion_tokens").to_pylist()), files=1,
                      inputs=sum(first))


def rows_in(paths: Iterable[Location]) -> int:
    """Rows of part files, from their footers."""
    return sum(pq.ParquetFile(p.open()).metadata.num_rows for p in paths)


def read_stats(path: Location) -> WriteStats:
    """``stats_of`` a part file, reading only the columns it needs."""
    f = pq.ParquetFile(path.open())
    wanted = ["finish_reason", "prompt_tokens", "completion_tokens", "sample_index"]
    return stats_of(f.read(columns=[c for c in wanted if c in f.schema_arrow.names]))


def run_metadata(**fields: object) -> dict[str, str]:
    """Parquet key-value metadata: every value as text (JSON for structures)."""
    return {f"shardgen.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}

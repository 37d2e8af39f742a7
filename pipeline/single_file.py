"""``single_file``: the run's rows in input order, as one Parquet file, for users who hand a file on.

Written at the end of a run (a resumed run included) from every part file in the output, as the OpenAI batch
output is: the part files stay the record that resume reads, and nothing is lost if the run stops before the end (a
rerun writes the file). Input order is the order of the input files (sorted, as the run reads them) and of the rows
in each; a row's n samples follow each other by ``sample_index``. The rows are sorted in the driver: the file is for
outputs that fit its memory (a few GB); read the part files of a bigger output with any Parquet reader.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from shardgen.pipeline.stages import read
from shardgen.pipeline.stages.write import existing_output
from shardgen.pipeline.storage import Location, Where


def check_single_file(single_file: Where, output: Where, input: Where) -> None:
    """The file must be a .parquet path outside the output directory (whose readers would read its rows twice) and
    not the input."""
    where, out, inp = Location.of(single_file), Location.of(output), Location.of(input)
    if where.suffix.lower() != ".parquet":
        raise ValueError(f"`single_file` {where}: name a .parquet file")
    if where.within(out):
        raise ValueError(f"`single_file` {where} is inside `output` {out}, whose readers would read its rows twice "
                         f"(beside the part files); put it elsewhere, e.g. {out.text.rstrip('/')}.parquet")
    if where.within(inp):
        raise ValueError(f"`single_file` {where} is inside the input {inp}; put it elsewhere")


def write_single_file(single_file: Where, output: Location, files: list[Location], root: Location,
                      prompt_column: str, id_column: str | None, input_format: str) -> int:
    """Write every row of the part files in ``output`` into ``single_file`` in input order; returns the rows."""
    parts = existing_output(output)
    rows = pads.dataset([p.path for p in parts], format="parquet", filesystem=parts[0].fs).to_table()
    position = _positions(files, root, prompt_column, id_column, input_format)
    keys = pa.table({"position": pa.array([position.get(i, len(position)) for i in rows.column("id").to_pylist()],
                                          pa.int64()), "sample": rows.column("sample_index")})
    rows = rows.take(pc.sort_indices(keys, [("position", "ascending"), ("sample", "ascending")]))
    schema = pq.ParquetFile(parts[0].open()).schema_arrow
    buffer = pa.BufferOutputStream()
    pq.write_table(rows.select(schema.names).replace_schema_metadata(schema.metadata), buffer)
    Location.of(single_file).write_bytes(buffer.getvalue())
    return rows.num_rows


def _positions(files: list[Location], root: Location, prompt_column: str, id_column: str | None,
               input_format: str) -> dict[str, int]:
    """Each input row's id (as the run read and named it) -> its place in the input."""
    position: dict[str, int] = {}
    for f in files:
        for table in read.read_file(f, f.relative_to(root), prompt_column, id_column, input_format):
            for row_id in table.column("id").to_pylist():
                position.setdefault(row_id, len(position))
    return position

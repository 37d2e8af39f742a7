"""The processor's first stage: a user's Ray Dataset as the rows the later stages take, (id, prompt, row) as the
read stage makes them of files, with the dataset's other columns carried along in their own types."""

from __future__ import annotations

import pyarrow as pa

from shardgen.pipeline.columns import RESERVED
from shardgen.pipeline.stages.read import DEFAULT_ID_COLUMN, OVERRIDE_COLUMNS, normalize_rows

READS: tuple[str, ...] = ()
WRITES = ("id", "prompt", "row")


def check_dataset_columns(columns: list[str], prompt_column: str, id_column: str | None) -> None:
    """A Ray Dataset given to a processor has the prompt column, the id column if one is named, and no other column
    with the name of one shardgen writes (the others are carried into the output)."""
    consumed = {prompt_column, *OVERRIDE_COLUMNS, id_column or DEFAULT_ID_COLUMN}
    clash = [c for c in columns if c in RESERVED and c not in consumed]
    if clash:
        raise ValueError(f"the dataset's column {clash[0]!r} has the name of a column shardgen writes; rename it "
                         f"(the dataset's other columns are carried into the output beside shardgen's)")
    if prompt_column not in columns:
        raise ValueError(f"the dataset has no column {prompt_column!r} (columns: {columns}); pass `prompt_column` "
                         f"with the one that holds the prompts")
    if id_column is not None and id_column not in columns:
        raise ValueError(f"the dataset has no column {id_column!r} (columns: {columns}); pass `id_column` with a "
                         f"column of unique ids, or leave it out for made-up ids")


def dataset_rows(batch: pa.Table, prompt_column: str, id_column: str | None) -> pa.Table:
    """A block of a user's Ray Dataset as (id, prompt, row), as ``read_file`` makes them of a file's rows. Ids come
    from ``id_column`` (or ``id`` when the dataset has it); without one, each row gets ``<block uuid>:<row>``,
    unique but not the same in another run (seeded sampling derives a row's seed from its id: give ids to
    reproduce it)."""
    import uuid

    check_dataset_columns(batch.column_names, prompt_column, id_column)
    if id_column is None and DEFAULT_ID_COLUMN in batch.column_names:
        id_column = DEFAULT_ID_COLUMN
    wanted = [prompt_column, *OVERRIDE_COLUMNS] + ([id_column] if id_column else [])
    columns = {c: batch.column(c).to_pylist() for c in wanted if c in batch.column_names}
    table = normalize_rows(columns, [None] * batch.num_rows, "parquet", prompt_column, id_column,
                       (uuid.uuid4().hex[:16], 0))
    for name in batch.column_names:  # the dataset's other columns ride along, with their types
        if name not in wanted and name != DEFAULT_ID_COLUMN:
            table = table.append_column(batch.schema.field(name), batch.column(name))
    return table

"""Ids: which ids an output already holds (a resumed run skips them), and whether the input's ids are unique.

Ids are kept as 16-byte digests in ``IdShard`` actors, each owning the ids whose
digest falls in its share, so no process (the driver least of all) holds every
id: 1,000,000 finished rows cost 16 MB spread over the shards.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardgen.pipeline.storage import Location

ROWS_PER_SHARD = 5_000_000
MAX_SHARDS = 16
LOCAL_ID_CHECK_BYTES = 16 * 2**20  # inputs up to this size have their ids checked in the driver (~60 MB of ids at most)
READS = ("id",)
WRITES = ("id", "prompt", "row")


def digests(ids: Iterable[str]) -> np.ndarray:
    """16-byte digests of ids (a collision among 10^12 ids has odds ~1e-15)."""
    return np.array([hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids], dtype="S16")


def shard_of(d: np.ndarray, shards: int) -> np.ndarray:
    # The first two bytes of a blake2b digest are uniform: a fair split whatever the ids look like.
    raw = np.frombuffer(d.tobytes(), dtype=np.uint8).reshape(-1, 16)
    return (raw[:, 0].astype(np.int64) * 256 + raw[:, 1]) % shards


def shard_count(rows: int) -> int:
    """At least two shards, so even a small output is never held whole in one process."""
    return max(2, min(MAX_SHARDS, math.ceil(rows / ROWS_PER_SHARD)))


class IdShard:
    """The ids (as digests) whose shard is ``index`` of ``shards``: a Ray actor."""

    def __init__(self, index: int, shards: int) -> None:
        self.index, self.shards = index, shards
        self._chunks: list[np.ndarray] = []
        self._sorted = np.empty(0, dtype="S16")

    def load_output(self, files: list[Location]) -> int:
        """Add the ids of finished output files (reads only their id column); returns how many this shard holds."""
        for file in files:
            for batch in pq.ParquetFile(file.open()).iter_batches(columns=["id"], batch_size=65536):
                self.add(digests(i for i in batch.column(0).to_pylist() if i is not None))
        return self.seal()

    def add(self, d: np.ndarray) -> None:
        mine = d[shard_of(d, self.shards) == self.index]
        if len(mine):
            self._chunks.append(mine)

    def seal(self) -> int:
        """Merge what was added into one sorted array; returns its length (with repeats)."""
        if self._chunks:
            self._sorted = np.sort(np.concatenate([self._sorted, *self._chunks]))
            self._chunks = []
        return len(self._sorted)

    def repeated(self, limit: int = 5) -> list[bytes]:
        """Up to ``limit`` digests that were added more than once."""
        s = self._sorted
        return [bytes(x) for x in np.unique(s[1:][s[1:] == s[:-1]])[:limit]]

    def contains(self, d: np.ndarray) -> np.ndarray:
        if not len(self._sorted) or not len(d):
            return np.zeros(len(d), dtype=bool)
        at = np.minimum(np.searchsorted(self._sorted, d), len(self._sorted) - 1)
        return self._sorted[at] == d


def start_shards(shards: int) -> list:
    import ray

    actor = ray.remote(num_cpus=0)(IdShard)
    return [actor.remote(i, shards) for i in range(shards)]


def stop_shards(handles: list) -> None:
    import ray

    for h in handles:
        ray.kill(h)


def route(handles: list, d: np.ndarray) -> list:
    """Split digests by shard and send each part to its shard's ``add``; returns the calls' refs."""
    where = shard_of(d, len(handles))
    return [h.add.remote(d[where == s]) for s, h in enumerate(handles) if (where == s).any()]


def ask(handles: list, d: np.ndarray) -> np.ndarray:
    """Which digests the shards hold."""
    import ray

    found = np.zeros(len(d), dtype=bool)
    where = shard_of(d, len(handles))
    parts = [(s, h.contains.remote(d[where == s])) for s, h in enumerate(handles) if (where == s).any()]
    for s, ref in parts:
        found[where == s] = ray.get(ref)
    return found


# ------------------------------------------------------------------------- the checks a run makes


def check_unique_ids(ds, id_column: str, rows_estimate: int) -> None:
    """Refuse null or repeated ids in the input (read as ``(id, prompt, row)``), naming a few, before any generation.

    Spread over ``IdShard`` actors, for inputs too big for the driver (``check_unique_ids_locally`` otherwise)."""
    import ray

    handles = start_shards(shard_count(rows_estimate))
    try:
        _refuse_nulls(ds.map_batches(_add_ids, fn_kwargs={"handles": handles}, batch_format="pyarrow",
                                     batch_size=8192).sum("nulls") or 0, id_column)
        ray.get([h.seal.remote() for h in handles])
        repeated = {d for found in ray.get([h.repeated.remote() for h in handles]) for d in found}
        if repeated:
            names = ds.map_batches(_name_ids, fn_kwargs={"wanted": repeated}, batch_format="pyarrow",
                                   batch_size=8192).take(len(repeated) * 2)
            _refuse_repeats(sorted({r["id"] for r in names})[:5], id_column)
    finally:
        stop_shards(handles)


def check_unique_ids_locally(files: list[Location], id_column: str) -> None:
    """``check_unique_ids`` in this process, for inputs of at most ``LOCAL_ID_CHECK_BYTES``: a distributed pass
    costs seconds of start-up (a Ray Data job and its shard actors) whatever the input's size."""
    from shardgen.pipeline.stages.read import iter_ids

    seen: set[str] = set()
    repeated: set[str] = set()
    nulls = 0
    for file in files:
        for ids in iter_ids(file, id_column):
            for i in ids:
                if i is None:
                    nulls += 1
                elif i in seen:
                    repeated.add(i)
                else:
                    seen.add(i)
    _refuse_nulls(nulls, id_column)
    if repeated:
        _refuse_repeats(sorted(repeated)[:5], id_column)


def _refuse_nulls(nulls: int, id_column: str) -> None:
    if nulls:
        raise ValueError(f"the id column {id_column!r} is null or empty in {nulls:,} row(s); give every row an id, "
                         f"or pass `id_column` with a column that has none missing")


def _refuse_repeats(examples: list[str], id_column: str) -> None:
    raise ValueError(f"the id column {id_column!r} repeats ids, e.g. {examples}; every row needs its own id "
                     f"(fix the input, or pass `id_column` with a unique column)")


def _add_ids(batch: pa.Table, handles: list) -> pa.Table:
    import ray

    ids = batch.column("id").to_pylist()
    present = [i for i in ids if i is not None]
    ray.get(route(handles, digests(present)))
    return pa.table({"nulls": [len(ids) - len(present)]})


def _name_ids(batch: pa.Table, wanted: set[bytes]) -> pa.Table:
    ids = [i for i in batch.column("id").to_pylist() if i is not None]
    keep = [i for i, d in zip(ids, digests(ids)) if bytes(d) in wanted]
    return pa.table({"id": pa.array(keep, pa.string())})


def skip_finished(batch: pa.Table, handles: list) -> pa.Table:
    """Resume stage (Ray Data map_batches): drops input rows whose id the output already holds."""
    done = ask(handles, digests(batch.column("id").to_pylist()))
    return batch.filter(pa.array(~done)) if done.any() else batch


@dataclass
class FinishedIds:
    """The ids an output already holds, loaded into shards for a resumed run: ``rows`` output rows answering
    ``inputs`` input rows (n samples of a row are written together, in one part file, so an id found is done)."""

    rows: int
    handles: list
    inputs: int

    @classmethod
    def load(cls, files: list[Location]) -> "FinishedIds":
        import ray

        from shardgen.pipeline.stages.write import WriteStats, read_stats

        stats = WriteStats()
        for f in files:
            stats.add(read_stats(f))
        handles = start_shards(shard_count(stats.rows))
        ray.get([h.load_output.remote(files) for h in handles])
        return cls(stats.rows, handles, stats.inputs)

    def close(self) -> None:
        stop_shards(self.handles)

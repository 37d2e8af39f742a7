"""Generate stage: a Ray Data actor pool of R replicas; each actor owns one replica (T ShardWorkers).

Several batches are in flight per actor, so a replica's engine is refilled while the long tail of one batch
finishes. A batch's rows reach the output when the whole batch is done, but rows finished earlier are not held that
long: every ``Flush.seconds`` (or ``Flush.rows`` finished rows) the finished rows of all the batches in flight are
detokenized and written as one part file from here, and left out of what their batches return. So what a run loses when it is stopped is bounded in time, whatever
the batch size; on a stop (``RunControl``) each batch writes what is finished and returns.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from shardgen.actors.engine.sequence import FINISH_ERROR, Completion, Request
from shardgen.actors.worker import ReplicaSpec
from shardgen.pipeline.columns import OUTPUT_SCHEMA, carried, params_list
from shardgen.pipeline.resume import IdShard, digests
from shardgen.pipeline.storage import Location

if TYPE_CHECKING:
    from shardgen.actors.replica import Replica

READS = ("id", "prompt", "prompt_token_ids", "params", "error")
WRITES = ("id", "sample_index", "prompt", "completion_token_ids", "completion_text", "prompt_tokens", "completion_tokens",
          "finish_reason", "error", "logprobs", "top_logprobs", "prompt_logprobs", "layout")


log = logging.getLogger(__name__)
MAX_REPLICA_STARTS = 3  # a replica that fails this often (bad GPU, out of memory) stops the job
GAVE_UP = re.compile(r"a replica failed \d+ times \(last: .*")  # that message, found under Ray's wrappers


@dataclass(frozen=True)
class Flush:
    """Where and how often finished rows are written before their batch is done."""

    output: Location
    metadata: dict[str, str]  # the Parquet metadata of every part file (write.run_metadata)
    model_dir: str  # for the detokenizer
    seconds: float = 10.0
    rows: int = 256
    control: str | None = None  # the name of the run's RunControl actor, polled for a stop


@dataclass(eq=False)
class _InFlight:
    """A batch being generated: its completions so far (a row's n samples finish together), and which of its
    finished rows are not written yet."""

    batch: pa.Table
    results: dict[int, list[Completion]] = field(default_factory=dict)
    unwritten: list[int] = field(default_factory=list)


class GenerateStage:
    """One replica; if a worker dies, the replica is replaced and the unfinished rows of its batches run again."""

    def __init__(self, spec: ReplicaSpec, flush: Flush | None = None) -> None:
        self.spec = spec
        self.flush = flush
        self._lock = threading.Lock()  # several batches are in flight: one of them replaces the replica
        self._detokenize = None
        self._flush_lock = threading.Lock()  # the batches in flight and their finished, unwritten rows
        self._in_flight: list[_InFlight] = []
        self._oldest: float | None = None  # when the oldest unwritten finished row (of any batch) finished
        self.stopping = threading.Event()
        self._key = uuid.uuid4().hex  # this stage's line in the run's token count
        self._tokens_before = (0, 0)  # generated and taken from the prefix cache by replicas this stage replaced
        self.starts = 0
        self._written = self._written_before_restart()
        self.replica = self._start(None)  # last: a replica that never starts leaves a whole object for __del__
        if flush is not None and flush.control is not None:
            threading.Thread(target=self._watch_control, args=(flush.control,), daemon=True).start()

    def __del__(self) -> None:
        # Ray Data deletes its UDF when the pool's actors shut down gracefully: free the replica's placement group
        # now, or it holds its CPUs and GPUs until the Ray job ends and a later run of the dataset waits for them.
        self.stopping.set()
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.kill()

    def _written_before_restart(self) -> IdShard | None:
        """The ids the output holds, when Ray has restarted this actor (its process died): Ray Data then sends the
        batches it had in flight again, and the rows of them it had flushed are written already. None on a first
        start: no row of a batch not yet seen can be in the output (the skip-finished stage left out the earlier
        runs' rows)."""
        if self.flush is None or not restarted_actor():
            return None
        from shardgen.pipeline.stages.write import existing_output

        written = IdShard(0, 1)
        rows = written.load_output(existing_output(self.flush.output))
        log.warning("generate stage restarted: %d rows are in the output; the batches it had in flight run again "
                    "without them", rows)
        return written

    def _watch_control(self, control_name: str) -> None:
        """Tell the run's RunControl how many tokens this stage's engines generated (the progress line counts
        them), and ask it whether the run is stopping."""
        import ray

        control = ray.get_actor(control_name)
        while not self.stopping.is_set():
            self._report_tokens(control)
            try:
                if ray.get(control.stopping.remote(), timeout=10):
                    self.stopping.set()
                    return
            except ray.exceptions.GetTimeoutError:  # a busy node: ask again
                continue
            except ray.exceptions.RayActorError:  # the run is over: Ray tears this actor down too
                return
            time.sleep(0.5)

    def _report_tokens(self, control) -> None:
        replica = self.replica
        try:
            generated, cached = replica.token_counts()
        except Exception as e:  # a replica starting, failing or being replaced: its batches handle that
            log.debug("no token count from the replica: %s", e)
            return
        if replica is self.replica:  # not replaced meanwhile (its count is in _tokens_before then)
            control.report.remote(self._key, self._tokens_before[0] + generated, replica.layout,
                                  self._tokens_before[1] + cached)

    def _stream(self, requests: list[Request]):
        """(index, completion) lists as they finish (a request's samples in the same list), across replacements of a
        failed replica (only the requests not yet finished run again)."""
        from shardgen.actors.replica import ReplicaFailed

        left = dict(enumerate(requests))
        while left:
            replica = self.replica
            order = list(left)
            try:
                for done in replica.stream([left[i] for i in order]):
                    found = [(order[j], c) for j, c in done]
                    for i, _ in found:
                        left.pop(i, None)
                    yield found
            except ReplicaFailed as e:
                self._replace(replica, e)

    def _replace(self, failed, error: Exception) -> None:
        with self._lock:
            if self.replica is not failed:  # another batch already replaced it
                return
            failed.kill()
            self._tokens_before = (self._tokens_before[0] + failed.last_generated_tokens,
                                   self._tokens_before[1] + failed.last_cached_tokens)
            self.replica = self._start(error)

    def _start(self, error: Exception | None) -> Replica:
        """A new replica, after ``error`` (None: the first). One whose worker dies while it starts (its node lost
        during setup) is started again; MAX_REPLICA_STARTS starts in all stop the job."""
        from shardgen.actors.replica import Replica, ReplicaFailed

        while True:
            if error is not None:
                if self.starts >= MAX_REPLICA_STARTS:
                    raise RuntimeError(f"a replica failed {self.starts} times (last: {error}); giving up. Check the "
                                       f"workers' GPUs and memory; rows written so far are kept, rerun to resume")
                log.warning("replica failed (%s); starting a new one and retrying its batches", error)
            self.starts += 1
            try:
                return Replica(self.spec)
            except ReplicaFailed as e:
                error = e

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.column("error").to_pylist()
        tokens = batch.column("prompt_token_ids").to_pylist()
        params = params_list(batch.column("params"))
        ids = batch.column("id").to_pylist()
        written = (self._written.contains(digests(ids)) if self._written is not None
                   else [False] * len(ids))  # flushed before this actor's restart: not again
        todo = [i for i, e in enumerate(errors) if e is None and not written[i]]
        requests = [Request(ids[i], tokens[i], params[i]) for i in todo]
        mine = _InFlight(batch, unwritten=[i for i, e in enumerate(errors)
                                           if e is not None and not written[i]])  # error rows: ready
        with self._flush_lock:
            self._in_flight.append(mine)
            if mine.unwritten and self._oldest is None:
                self._oldest = time.monotonic()
        try:
            for done in self._stream(requests) if requests else ():
                with self._flush_lock:
                    if done and self._oldest is None:
                        self._oldest = time.monotonic()
                    for j, completion in done:
                        if todo[j] not in mine.results:
                            mine.unwritten.append(todo[j])
                        mine.results.setdefault(todo[j], []).append(completion)
                stop = self.stopping.is_set()
                if self.flush is not None and (stop or self._flush_due()):
                    self._flush_finished()
                if stop:  # the run is stopping: what is finished is written; the rest is for the rerun
                    return self._rows(batch, [], mine.results)
        finally:
            with self._flush_lock:
                self._in_flight.remove(mine)
                rows, mine.unwritten = sorted(mine.unwritten), []
                if not any(f.unwritten for f in self._in_flight):
                    self._oldest = None
        return self._rows(batch, rows, mine.results)

    def _flush_due(self) -> bool:
        with self._flush_lock:
            waiting = sum(len(f.unwritten) for f in self._in_flight)
            return waiting > 0 and (waiting >= self.flush.rows or time.monotonic() - self._oldest >= self.flush.seconds)

    def _flush_finished(self) -> None:
        """Write the finished rows of every batch in flight as one part file (one file per flush, not per batch)."""
        with self._flush_lock:
            tables = [self._rows(f.batch, sorted(f.unwritten), f.results) for f in self._in_flight if f.unwritten]
            for f in self._in_flight:
                f.unwritten = []
            self._oldest = None
        if tables:
            self._write(pa.concat_tables(tables))

    def _rows(self, batch: pa.Table, rows: list[int], results: dict[int, list[Completion]]) -> pa.Table:
        """The output rows of ``rows`` of the batch: one per sample of a row's completions, or one with its error."""
        # only the rows asked for: a flush writes a few rows of each batch in flight, often
        picked = batch.select(["prompt_token_ids", "error"]).take(pa.array(rows, pa.int64()))
        lengths = pc.list_value_length(picked.column("prompt_token_ids")).fill_null(0).to_pylist()
        errors = picked.column("error").to_pylist()
        take, values = [], []
        for j, i in enumerate(rows):
            for r in results.get(i) or [None]:
                take.append(i)
                values.append(_output_values(r, lengths[j], errors[j]))
        taken = batch.take(pa.array(take, pa.int64()))
        return pa.table({
            "id": taken.column("id"), "prompt": taken.column("prompt"),
            **{k: pa.array([v[k] for v in values], t) for k, t in OUTPUT_TYPES.items()},
            "layout": pa.array([self.replica.layout] * len(take), pa.string()),
            **{name: taken.column(name) for name in carried(batch)},
        })

    def _write(self, rows: pa.Table) -> None:
        """Detokenize and write finished rows now, as the detokenize stage and the sink would."""
        from shardgen.pipeline.stages import write
        from shardgen.pipeline.stages.detokenize import DetokenizeStage

        if self._detokenize is None:
            self._detokenize = DetokenizeStage(self.flush.model_dir)
        write.write_part(self.flush.output, self._detokenize(rows), self.flush.metadata)


def restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray has restarted (False outside an actor)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return False
    return bool(ray.get_runtime_context().was_current_actor_reconstructed)


# The columns this stage makes, in the output schema's types (completion_text: a completion a stop string cut)
OUTPUT_TYPES = {name: OUTPUT_SCHEMA.field(name).type for name in (
    "sample_index", "completion_token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "error", "logprobs",
    "top_logprobs", "prompt_logprobs")} | {"completion_text": pa.string()}


def _output_values(r: Completion | None, prompt_tokens: int, error: str | None) -> dict:
    """The ``OUTPUT_TYPES`` columns of one output row: a sample's completion, or (None) the row's error."""
    if r is None:
        return {"sample_index": None, "completion_token_ids": [], "completion_text": None,
                "prompt_tokens": prompt_tokens, "completion_tokens": 0, "finish_reason": FINISH_ERROR, "error": error,
                "logprobs": None, "top_logprobs": None, "prompt_logprobs": None}
    top = None if r.top_logprobs is None else [[{"token_id": t, "logprob": v} for t, v in step]
                                                for step in r.top_logprobs]
    return {"sample_index": None if r.finish_reason == FINISH_ERROR else r.sample_index, "completion_token_ids": r.token_ids, "completion_text": r.text,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids),
            "finish_reason": r.finish_reason, "error": r.error, "logprobs": r.logprobs, "top_logprobs": top,
            "prompt_logprobs": r.prompt_logprobs}

"""Generate stage: a Ray Data actor pool of R replicas; each actor owns one replica (T ShardWorkers).

Several batches are in flight per actor, so a replica's engine is refilled while
the long tail of one batch finishes.
"""

from __future__ import annotations

import logging
import threading

import pyarrow as pa

from actors.sequence import FINISH_ERROR, Request, SamplingParams
from actors.worker import ReplicaSpec

READS = ("id", "prompt", "prompt_token_ids", "params", "error")
WRITES = ("id", "prompt", "completion_token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "error",
          "params", "layout")


log = logging.getLogger(__name__)
MAX_REPLICA_STARTS = 3  # a replica that fails this often (bad GPU, out of memory) stops the job


class GenerateStage:
    """One replica; if a worker dies, the replica is replaced and the batches it held are run again."""

    def __init__(self, spec: ReplicaSpec) -> None:
        from actors.replica import Replica

        self.spec = spec
        self.replica = Replica(spec)
        self.starts = 1
        self._lock = threading.Lock()  # several batches are in flight: one of them replaces the replica

    def _generate(self, requests: list[Request]) -> list:
        from actors.replica import ReplicaFailed

        while True:
            replica = self.replica
            try:
                return replica.generate(requests)
            except ReplicaFailed as e:
                self._replace(replica, e)

    def _replace(self, failed, error: Exception) -> None:
        from actors.replica import Replica

        with self._lock:
            if self.replica is not failed:  # another batch already replaced it
                return
            try:
                failed.kill()
            except Exception as e:  # already gone: nothing left to free
                log.debug("killing the failed replica: %s", e)
            if self.starts >= MAX_REPLICA_STARTS:
                raise RuntimeError(f"a replica failed {self.starts} times (last: {error}); giving up. Check the "
                                   f"workers' GPUs and memory; rows written so far are kept, rerun to resume")
            log.warning("replica failed (%s); starting a new one and retrying its batches", error)
            self.replica = Replica(self.spec)
            self.starts += 1

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        tokens = batch.column("prompt_token_ids").to_pylist()
        params = batch.column("params").to_pylist()
        errors = batch.column("error").to_pylist()
        todo = [i for i, e in enumerate(errors) if e is None]
        requests = [Request(ids[i], tokens[i], SamplingParams.from_json(params[i])) for i in todo]
        results = dict(zip(todo, self._generate(requests))) if requests else {}
        out_ids, finish, prompt_n, completion_n, err = [], [], [], [], []
        for i in range(len(ids)):
            r = results.get(i)
            out_ids.append(r.token_ids if r else [])
            finish.append(r.finish_reason if r else FINISH_ERROR)
            prompt_n.append(r.prompt_tokens if r else len(tokens[i] or []))
            completion_n.append(len(r.token_ids) if r else 0)
            err.append(r.error if r else errors[i])
        return pa.table({
            "id": batch.column("id"), "prompt": batch.column("prompt"),
            "completion_token_ids": pa.array(out_ids, pa.list_(pa.int32())),
            "prompt_tokens": pa.array(prompt_n, pa.int32()), "completion_tokens": pa.array(completion_n, pa.int32()),
            "finish_reason": pa.array(finish, pa.string()), "error": pa.array(err, pa.string()),
            "params": batch.column("params"), "layout": pa.array([self.replica.layout] * len(ids), pa.string()),
        })

    def __del__(self) -> None:
        replica = getattr(self, "replica", None)
        if replica is not None:
            try:
                replica.shutdown()
            except Exception:  # the cluster may already be going down
                pass

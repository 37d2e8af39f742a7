"""One replica: T ``ShardWorker`` actors in one placement group, joined into one tensor-parallel group."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardgen.actors.engine.sequence import Completion, Request
from shardgen.actors.worker import ReplicaSpec, ShardWorker

log = logging.getLogger(__name__)
# Rank 0 serves several Ray Data batches at once (each waits in collect while the engine runs).
RANK0_CONCURRENCY = 64
HEALTH_CHECK_S = 10.0  # while a batch runs, every worker is pinged this often
POLL_S = 1.0  # how long one collect waits for a completion: the caller sees time pass at least this often
PING_TIMEOUT_S = 60.0


class ReplicaFailed(RuntimeError):
    """A worker of the replica died or stopped answering: the replica must be replaced."""


def placement_group_name(run_id: str, replica: str) -> str:
    return f"shardgen-{run_id}-{replica}"


class Replica:
    def __init__(self, spec: ReplicaSpec, strategy: str = "STRICT_PACK", ready_timeout_s: float = 600.0) -> None:
        self.spec = spec
        gpu = spec.device == "cuda"
        self.last_generated_tokens = 0
        self.last_cached_tokens = 0
        bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(spec.tp)], strategy=strategy,
                                  name=placement_group_name(spec.run_id, uuid.uuid4().hex[:8]))
        try:
            ray.get(self.pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            have = ray.cluster_resources()
            raise RuntimeError(
                f"could not place a replica of `tp` {spec.tp} ({spec.tp} x {bundle}) within {ready_timeout_s:.0f} s; "
                f"the cluster has {have.get('GPU', 0):g} GPUs and {have.get('CPU', 0):g} CPUs in all"
            ) from None
        actor = ray.remote(ShardWorker)
        self.workers = [
            actor.options(
                num_cpus=1, num_gpus=1 if gpu else 0,
                max_concurrency=RANK0_CONCURRENCY if rank == 0 else 2,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(rank, spec)
            for rank in range(spec.tp)
        ]
        try:
            address = ray.get(self.workers[0].rendezvous_address.remote())
            self.info = ray.get([w.setup.remote(address) for w in self.workers])
        except ray.exceptions.RayActorError as e:  # a worker died (its node lost): start again; errors go up as raised
            self.kill()
            raise ReplicaFailed(f"a ShardWorker died while the replica started: {type(e).__name__}") from e

    @property
    def layout(self) -> str:
        return self.info[0]["layout"]

    def stream(self, requests: list[Request], poll_s: float = POLL_S) -> Iterator[list[tuple[int, Completion]]]:
        """Run requests on rank 0's engine, yielding (index, completion) lists as they finish, an empty one at least
        every ``poll_s`` seconds (so the caller can flush or stop on time). Raises ``ReplicaFailed`` if any worker
        dies meanwhile: every wait is bounded by a health check, so a rank lost inside a collective (rank 0 still
        answers, its engine hangs) cannot hang the batch."""
        group = self._get(self.workers[0].submit.remote(requests))
        checked = time.monotonic()
        while True:
            done, finished = self._get(self.workers[0].collect.remote(group, poll_s))
            if time.monotonic() - checked >= HEALTH_CHECK_S:
                self.check_alive()
                checked = time.monotonic()
            yield done
            if finished:
                return

    def _get(self, ref: ray.ObjectRef) -> object:
        while True:
            ready, _ = ray.wait([ref], timeout=HEALTH_CHECK_S)
            if ready:
                try:
                    return ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise ReplicaFailed(f"rank 0 died: {e}") from e
                except ray.exceptions.RayTaskError as e:  # the engine failed (a rank lost mid-step)
                    raise ReplicaFailed(str(e).strip().splitlines()[-1]) from e
            self.check_alive()

    def check_alive(self) -> None:
        """Every worker answers, and rank 0's engine finishes steps: a rank hung without dying (a collective that
        never completes) leaves every actor answering pings, but stalls the engine past ``step_timeout_s``."""
        try:
            ray.get([w.ping.remote() for w in self.workers], timeout=PING_TIMEOUT_S)
            stalled = ray.get(self.workers[0].stalled_s.remote(), timeout=PING_TIMEOUT_S)
        except ray.exceptions.RayActorError as e:
            raise ReplicaFailed(f"a ShardWorker died: {type(e).__name__}") from e
        except ray.exceptions.GetTimeoutError as e:
            raise ReplicaFailed(f"a ShardWorker did not answer within {PING_TIMEOUT_S:.0f} s") from e
        limit = self.spec.engine.step_timeout_s
        if stalled > limit:
            raise ReplicaFailed(f"rank 0's engine finished no step in {stalled:.0f} s (`step_timeout_s` {limit:g}): "
                                f"a rank is stuck (a collective that never completes, or a wedged device)")

    def stats(self) -> dict:
        return ray.get(self.workers[0].stats.remote())

    def token_counts(self) -> tuple[int, int]:
        """Tokens rank 0's engine has generated so far (for the progress line) and prompt tokens it took from the
        prefix cache (for the summary); kept as ``last_generated_tokens`` and ``last_cached_tokens``."""
        counts = ray.get(self.workers[0].token_counts.remote(), timeout=PING_TIMEOUT_S)
        self.last_generated_tokens, self.last_cached_tokens = counts
        return counts

    def kill(self) -> None:
        """Stop every worker at once (some may be dead or stuck) and free the placement group. Best effort: what
        went with a lost node or cluster is already gone, and the rest is still freed."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception as e:
                log.debug("killing a ShardWorker: %s", e)
        try:
            remove_placement_group(self.pg)
        except Exception as e:
            log.debug("removing the replica's placement group: %s", e)

    def shutdown(self) -> None:
        # Rank 0 first: stopping its engine releases the followers from their collective.
        ray.get(self.workers[0].shutdown.remote(), timeout=60)
        ray.get([w.shutdown.remote() for w in self.workers[1:]], timeout=60)
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)

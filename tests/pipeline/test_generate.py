"""The generate stage's handling of replicas that fail (no Ray: the replica is replaced by a stand-in)."""

import pyarrow as pa
import pytest

import actors.replica
from actors.replica import ReplicaFailed
from actors.sequence import Completion, SamplingParams
from actors.worker import ReplicaSpec
from pipeline import generate
from pipeline.generate import GenerateStage


class FlakyReplica:
    """Fails its first ``failures`` generate calls across all instances, then completes every request."""

    made: list["FlakyReplica"] = []
    failures = 0
    layout = "cpu-dequantized"

    def __init__(self, spec: ReplicaSpec) -> None:
        self.killed = False
        FlakyReplica.made.append(self)

    def generate(self, requests):
        if FlakyReplica.failures > 0:
            FlakyReplica.failures -= 1
            raise ReplicaFailed("a ShardWorker died: RayActorError")
        return [Completion(r.request_id, [7, 8], "length", len(r.prompt_token_ids)) for r in requests]

    def kill(self) -> None:
        self.killed = True


@pytest.fixture
def flaky(monkeypatch):
    FlakyReplica.made = []
    monkeypatch.setattr(actors.replica, "Replica", FlakyReplica)
    return FlakyReplica


def batch() -> pa.Table:
    params = SamplingParams(max_new_tokens=2).to_json()
    return pa.table({"id": ["a", "b"], "prompt": ["x", None], "prompt_token_ids": [[1, 2], []],
                     "params": [params, params], "error": [None, "prompt: empty or null"]})


def test_a_failed_replica_is_replaced_and_the_batch_rerun(flaky):
    flaky.failures = 1
    out = GenerateStage(ReplicaSpec("m"))(batch()).to_pylist()
    assert [r["finish_reason"] for r in out] == ["length", "error"]
    assert out[0]["completion_token_ids"] == [7, 8] and out[1]["error"] == "prompt: empty or null"
    assert len(flaky.made) == 2 and flaky.made[0].killed and not flaky.made[1].killed


def test_a_replica_that_keeps_failing_stops_the_job_with_a_clear_message(flaky):
    flaky.failures = 100
    stage = GenerateStage(ReplicaSpec("m"))
    with pytest.raises(RuntimeError, match=rf"a replica failed {generate.MAX_REPLICA_STARTS} times .*giving up"):
        stage(batch())
    assert len(flaky.made) == generate.MAX_REPLICA_STARTS and all(r.killed for r in flaky.made)

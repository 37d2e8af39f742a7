"""The generate stage (no Ray: the replica is a stand-in): replicas that fail, and finished rows written before their
batch is done."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardgen.actors import replica as replica_module
from shardgen.actors.replica import ReplicaFailed
from shardgen.actors.engine.sequence import Completion, SamplingParams
from shardgen.actors.worker import ReplicaSpec
from shardgen.pipeline.columns import params_array
from shardgen.pipeline.stages import generate, write
from shardgen.pipeline.stages.generate import GenerateStage


class FlakyReplica:
    """Finishes its requests one at a time; the first ``failures`` streams across all instances fail after
    finishing ``fail_after`` requests."""

    made: list["FlakyReplica"] = []
    failures = 0
    fail_after = 1
    layout = "cpu-dequantized"
    last_generated_tokens = last_cached_tokens = 0  # what the progress line and the summary last heard from it

    def __init__(self, spec: ReplicaSpec) -> None:
        self.killed = False
        self.asked: list[list[str]] = []
        FlakyReplica.made.append(self)

    def stream(self, requests):
        self.asked.append([r.request_id for r in requests])
        for j, r in enumerate(requests):
            if j == FlakyReplica.fail_after and FlakyReplica.failures > 0:
                FlakyReplica.failures -= 1
                raise ReplicaFailed("a ShardWorker died: RayActorError")
            yield [(j, Completion(r.request_id, [7, 8], "length", len(r.prompt_token_ids)))]

    def kill(self) -> None:
        self.killed = True


@pytest.fixture
def flaky(monkeypatch):
    FlakyReplica.made, FlakyReplica.fail_after = [], 1
    monkeypatch.setattr(replica_module, "Replica", FlakyReplica)
    return FlakyReplica


def batch() -> pa.Table:
    params = params_array([SamplingParams(max_new_tokens=2)] * 3)
    return pa.table({"id": ["a", "b", "c"], "prompt": ["x", None, "z"], "prompt_token_ids": [[1, 2], [], [3]],
                     "params": params, "error": [None, "prompt: empty or null", None]})


def test_a_failed_replica_is_replaced_and_only_its_unfinished_rows_rerun(flaky):
    flaky.failures = 1
    out = GenerateStage(ReplicaSpec("m"))(batch()).to_pylist()
    assert [(r["id"], r["finish_reason"]) for r in out] == [("a", "length"), ("b", "error"), ("c", "length")]
    assert out[0]["completion_token_ids"] == [7, 8] and out[1]["error"] == "prompt: empty or null"
    assert len(flaky.made) == 2 and flaky.made[0].killed and not flaky.made[1].killed
    assert flaky.made[0].asked == [["a", "c"]] and flaky.made[1].asked == [["c"]]


def flush_to(tmp_path, seconds: float) -> generate.Flush:
    from shardgen.jobs.demo import demo_assets

    model, _ = demo_assets()
    return generate.Flush(tmp_path, {"shardgen.version": "test"}, str(model), seconds=seconds)


def test_finished_rows_are_written_before_their_batch_is_done_and_returned_once(flaky, tmp_path):
    """With a flush due at every completion, each finished row lands in its own part file at once; the batch
    returns only what is not written yet. Every row is in exactly one of the two."""
    out = GenerateStage(ReplicaSpec("m"), flush_to(tmp_path, seconds=0))(batch())
    files = write.existing_output(tmp_path)
    written = pa.concat_tables([pq.read_table(f.path) for f in files])
    assert len(files) == 2 and sorted(written.column("id").to_pylist() + out.column("id").to_pylist()) == ["a", "b", "c"]
    assert out.num_rows == 0
    completions = dict(zip(written.column("id").to_pylist(), written.column("completion").to_pylist()))
    assert completions["b"] is None and isinstance(completions["a"], str) and isinstance(completions["c"], str)
    assert written.schema.metadata[b"shardgen.version"] == b"test"


def test_a_restarted_stage_leaves_out_the_rows_its_first_life_wrote_of_a_batch_sent_again(flaky, tmp_path, monkeypatch):
    """Ray restarts a generate actor whose process died and sends its batches in flight again: the rows the first
    process had flushed of them are not generated or written a second time."""
    first = GenerateStage(ReplicaSpec("m"), flush_to(tmp_path, seconds=3600))
    first.stopping.set()
    first(batch())  # flushes "a" and the error row "b"; "c" is unfinished when the process "dies"
    monkeypatch.setattr(generate, "restarted_actor", lambda: True)
    again = GenerateStage(ReplicaSpec("m"), flush_to(tmp_path, seconds=3600))
    out = again(batch())
    assert flaky.made[-1].asked == [["c"]] and out.column("id").to_pylist() == ["c"]
    monkeypatch.setattr(generate, "restarted_actor", lambda: False)  # a first start reads nothing of the output
    assert GenerateStage(ReplicaSpec("m"), flush_to(tmp_path, seconds=3600))(batch()).num_rows == 3


def test_a_stop_writes_the_finished_rows_and_returns_nothing_else(flaky, tmp_path):
    stage = GenerateStage(ReplicaSpec("m"), flush_to(tmp_path, seconds=3600))
    stage.stopping.set()
    out = stage(batch())
    written = pa.concat_tables([pq.read_table(f.path) for f in write.existing_output(tmp_path)])
    assert out.num_rows == 0
    assert sorted(written.column("id").to_pylist()) == ["a", "b"]  # "c" never finished: the rerun makes it


def test_a_replica_that_keeps_failing_stops_the_job_with_a_clear_message(flaky):
    flaky.failures, flaky.fail_after = 100, 0
    stage = GenerateStage(ReplicaSpec("m"))
    with pytest.raises(RuntimeError, match=rf"a replica failed {generate.MAX_REPLICA_STARTS} times .*giving up"):
        stage(batch())
    assert len(flaky.made) == generate.MAX_REPLICA_STARTS and all(r.killed for r in flaky.made)


def test_a_replica_whose_worker_dies_while_it_starts_is_started_again(flaky, monkeypatch):
    """A node lost while a replica loads its model (tests/pipeline/test_lost_node.py, under load) failed the stage's
    constructor, and with it the job: the replica is started again instead, within the same MAX_REPLICA_STARTS."""
    deaths = {"left": 1}

    class DiesWhileStarting(FlakyReplica):
        def __init__(self, spec: ReplicaSpec) -> None:
            super().__init__(spec)
            if deaths["left"] > 0:
                deaths["left"] -= 1
                raise ReplicaFailed("a ShardWorker died while the replica started: ActorDiedError")

    monkeypatch.setattr(replica_module, "Replica", DiesWhileStarting)
    stage = GenerateStage(ReplicaSpec("m"))
    assert len(flaky.made) == 2 and stage.replica is flaky.made[1] and stage.starts == 2
    assert [r["finish_reason"] for r in stage(batch()).to_pylist()] == ["length", "error", "length"]

    deaths["left"] = 100
    with pytest.raises(RuntimeError, match=rf"a replica failed {generate.MAX_REPLICA_STARTS} times \(last: a "
                                           rf"ShardWorker died while the replica started.*giving up"):
        GenerateStage(ReplicaSpec("m"))


def test_the_inputs_carried_columns_follow_each_rows_samples_and_its_error_row(flaky):
    params = params_array([SamplingParams(max_new_tokens=2, n=2), None])
    table = pa.table({"id": ["a", "b"], "prompt": ["x", None], "prompt_token_ids": [[1, 2], []], "params": params,
                      "error": [None, "prompt: empty or null"], "topic": ["maths", "art"]})
    out = GenerateStage(ReplicaSpec("m"))(table).to_pylist()
    assert [(r["id"], r["topic"]) for r in out] == [("a", "maths"), ("b", "art")]

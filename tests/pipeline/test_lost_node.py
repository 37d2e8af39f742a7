"""A Ray cluster of several nodes on one machine (``ray.cluster_utils.Cluster``): where replicas go, and what losing a
node mid-run does. The head (1 CPU) runs the driver and the read tasks; three worker nodes of 2 CPUs each hold one
T=2 replica at most, so the two replicas land on two different nodes, each packed on one, and a replica of a lost
node can be rebuilt on the third."""

import threading
import time
from dataclasses import replace

import psutil
import pytest

from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.sequence import SamplingParams
from shardgen.pipeline.options import RunOptions
from shardgen.pipeline.run import run
from tests.pipeline.test_run import input_ids, read_output


@pytest.fixture()
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [c.add_node(num_cpus=2) for _ in range(3)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="WARNING")
    yield c, workers
    ray.shutdown()
    c.shutdown()


def _replica_nodes(nodes) -> dict[int, int]:
    """Worker node index -> how many shardgen ranks (ShardWorker processes) run under its raylet."""
    raylets = {n.all_processes["raylet"][0].process.pid: i for i, n in enumerate(nodes) if n.all_processes.get("raylet")}
    found: dict[int, int] = {}
    for p in psutil.process_iter(["cmdline"]):
        if "ShardWorker" in " ".join(p.info["cmdline"] or []):
            for parent in p.parents():
                if parent.pid in raylets:
                    found[raylets[parent.pid]] = found.get(raylets[parent.pid], 0) + 1
    return found


def test_a_node_lost_mid_run_has_its_replica_rebuilt_elsewhere_and_the_output_equals_an_uninterrupted_run(
        demo, tmp_path, cluster):
    c, nodes = cluster
    model, prompts = demo
    # 8 sequences an engine: each replica is given 4 batches at a time, so neither takes the whole input
    options = RunOptions(model=model, input=prompts, output=tmp_path / "calm", replicas=2, tp=2, batch_size=8,
                         address=c.address, sampling=SamplingParams(max_new_tokens=16),
                         engine=EngineConfig(max_num_seqs=8))
    start = time.monotonic()
    calm = run(options)
    calm_s = time.monotonic() - start

    hurt_dir, result = tmp_path / "hurt", {}

    def hurt_run() -> None:  # the run's own exception, if any, is raised below with its traceback
        try:
            result["summary"] = run(replace(options, output=hurt_dir))
        except BaseException as e:
            result["error"] = e

    job = threading.Thread(target=hurt_run)
    start = time.monotonic()
    job.start()
    deadline = time.monotonic() + 300
    placed: dict[int, int] = {}
    while time.monotonic() < deadline:  # both replicas up and generating
        placed = _replica_nodes(nodes)
        if len(placed) == 2 and list(hurt_dir.glob("part-*.parquet")):
            break
        time.sleep(0.2)
    # two replicas of two ranks: two nodes, each holding a whole TP group
    assert sorted(placed.values()) == [2, 2], placed
    victim = next(iter(placed))
    written_before = len(read_output(hurt_dir))
    c.remove_node(nodes[victim])  # its raylet and every process under it, and the object copies it held
    after: set[int] = set()  # nodes that held ranks after the loss
    while job.is_alive() and time.monotonic() < deadline + 300:
        after |= set(_replica_nodes(nodes))
        time.sleep(0.5)
    job.join(timeout=60)
    assert not job.is_alive(), "the job hung after a node was lost"
    if "error" in result:
        raise result["error"]
    hurt_s = time.monotonic() - start
    hurt, calm_rows = read_output(hurt_dir), read_output(tmp_path / "calm")
    print(f"lost worker node {victim} (of 3) after {written_before} of 200 rows were written; the run finished in "
          f"{hurt_s:.1f} s against {calm_s:.1f} s uninterrupted, with {len(hurt)} rows and "
          f"{result['summary'].errors} errors; ranks now on nodes {after}")
    assert written_before < 200
    assert after == {0, 1, 2} - {victim}  # the survivor kept its replica; the lost one was rebuilt on the third
    assert set(hurt) == set(calm_rows) == input_ids(prompts) and result["summary"].errors == calm.errors == 0
    assert result["summary"].rows == 200  # every id once: no row written twice
    assert all(hurt[i]["completion_token_ids"] == calm_rows[i]["completion_token_ids"] for i in hurt)

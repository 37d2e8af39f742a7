"""``shardgen.build_processor``: the run's stages on a user's Ray Dataset (CPU, the demo model)."""

import json
import warnings

import pytest

import shardgen
from shardgen.pipeline.columns import OUTPUT_SCHEMA

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("two_cpus")]


@pytest.fixture(scope="module")
def two_cpus():
    """A cluster as small as a laptop's or CI's: one CPU for the rank, one for the input's tasks."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def processor(demo, two_cpus):
    model, _ = demo
    p = shardgen.build_processor(shardgen.ProcessorConfig(
        model=model, batch_size=8, sampling=shardgen.SamplingParams(max_new_tokens=6)))
    yield p
    p.release()


def test_a_dataset_of_prompts_gives_the_completions_of_shardgen_run_for_the_same_rows(demo, processor, tmp_path):
    import ray

    model, prompts = demo
    rows = [json.loads(line) for line in prompts.read_text().splitlines()[:24]]
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shardgen.run(shardgen.RunOptions(model=model, input=subset, output=tmp_path / "out", batch_size=8,
                                     sampling=shardgen.SamplingParams(max_new_tokens=6)))
    written = {r["id"]: r for r in ray.data.read_parquet(str(tmp_path / "out")).take_all()}

    # composed with the user's own map before and filter after, as a Ray Data user would
    ds = ray.data.from_items(rows).map(lambda r: {**r, "prompt": r["prompt"]})
    out = processor(ds).filter(lambda r: r["finish_reason"] != "error").take_all()
    assert sorted(r["id"] for r in out) == sorted(written)
    for r in out:
        assert r["completion"] == written[r["id"]]["completion"]
        assert r["completion_token_ids"] == written[r["id"]]["completion_token_ids"]
    assert processor(ds).schema().names == OUTPUT_SCHEMA.names  # the rows had no other columns
    with pytest.raises(ValueError, match="the dataset's column 'completion' has the name of a column shardgen writes"):
        processor(ray.data.from_items([{"prompt": "x", "completion": "mine"}]))


def test_per_row_columns_override_the_config_and_every_row_yields_its_rows_or_one_error(processor):
    import ray

    items = [{"prompt": f"Once upon a time {i}", "n": None, "max_new_tokens": None, "topic": i} for i in range(6)]
    items[1]["n"] = 3
    items[2]["max_new_tokens"] = 2
    items[3]["prompt"] = None
    items[4]["n"] = 0
    out = processor(ray.data.from_items(items)).take_all()
    by_prompt: dict = {}
    for r in out:
        by_prompt.setdefault(r["prompt"], []).append(r)
    assert len(out) == 1 + 3 + 1 + 1 + 1 + 1
    assert sorted(r["sample_index"] for r in by_prompt["Once upon a time 1"]) == [0, 1, 2]
    assert len({r["id"] for r in by_prompt["Once upon a time 1"]}) == 1  # one id for a row's samples
    assert len({r["id"] for r in out}) == 6  # made-up ids, one per input row
    assert by_prompt["Once upon a time 2"][0]["completion_tokens"] == 2
    assert [r["topic"] for r in by_prompt["Once upon a time 1"]] == [1, 1, 1]  # the dataset's own column, typed
    assert by_prompt[None][0]["error"] == "prompt: empty or null"
    (bad_n,) = by_prompt["Once upon a time 4"]
    assert bad_n["finish_reason"] == "error" and "n" in bad_n["error"] and bad_n["sample_index"] is None


def test_an_id_column_names_the_rows_and_a_missing_prompt_column_is_refused_naming_it(processor):
    import ray
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():  # the stages use Ray Data's current API: no deprecation shown to the user
        warnings.simplefilter("error", RayDeprecationWarning)
        ds = processor(ray.data.from_items([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}]))
    out = ds.take_all()
    assert sorted(r["id"] for r in out) == ["a", "b"]
    with pytest.raises(ValueError, match=r"the dataset has no column 'prompt' \(columns: \['text'\]\); pass "
                                         r"`prompt_column`"):
        processor(ray.data.from_items([{"text": "x"}]))


def test_a_dataset_runs_again_on_a_small_cluster_and_release_frees_the_replicas(demo):
    """Each run of the returned dataset starts its replicas and frees them when it ends (their placement groups
    would otherwise hold the cluster's CPUs until the Ray job ends, and a second run would wait for them forever)."""
    import threading
    import time

    import ray
    from ray.util import placement_group_table

    model, _ = demo
    p = shardgen.build_processor(shardgen.ProcessorConfig(model=model, sampling=shardgen.SamplingParams(
        max_new_tokens=2)))
    out = p(ray.data.from_items([{"prompt": "hi"}, {"prompt": "ho"}]))
    mine = lambda: [v for v in placement_group_table().values()  # noqa: E731
                    if p.replicas.spec.run_id in v["name"] and v["state"] != "REMOVED"]
    for run in range(2):
        rows: list = []
        job = threading.Thread(target=lambda: rows.extend(out.take_all()), daemon=True)
        job.start()
        job.join(timeout=180)
        assert len(rows) == 2, f"run {run} of the dataset did not finish"
        deadline = time.monotonic() + 30
        while mine() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not mine()
    p.release()
    assert not mine()


def test_a_bad_config_is_refused_naming_the_field_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="`tp` must be >= 1"):
        shardgen.ProcessorConfig(model=tmp_path, tp=0)
    with pytest.raises(FileNotFoundError):
        shardgen.build_processor(shardgen.ProcessorConfig(model=tmp_path / "nothing"))

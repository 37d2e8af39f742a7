"""Inputs and outputs on object storage: a whole run against a real S3-compatible server on localhost (moto's
server mode), through pyarrow's S3 filesystem, as on a cluster whose prompts and results live in a bucket."""

import json
import os

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from shardgen.actors.engine.sequence import SamplingParams
from shardgen.jobs.demo import demo_assets
from shardgen.pipeline import output_dir
from shardgen.pipeline.options import RunOptions
from shardgen.pipeline.run import run

pytestmark = pytest.mark.slow
BUCKET = "shardgen-test"
PROMPTS = [{"id": f"q{i:03d}", "prompt": f"def f{i}(x):\n    return"} for i in range(6)]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server and a local Ray cluster whose workers see its endpoint (they inherit the environment)."""
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    lines = "".join(json.dumps(p) + "\n" for p in PROMPTS[:4])
    client.put_object(Bucket=BUCKET, Key="in/a.jsonl", Body=lines.encode())
    csv = "id,prompt\n" + "".join(f'{p["id"]},"{p["prompt"]}"\n' for p in PROMPTS[4:])
    client.put_object(Bucket=BUCKET, Key="in/more/b.csv", Body=csv.encode())
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield client
    ray.shutdown()
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def outputs(prefix: str) -> dict[str, dict]:
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/{prefix}")
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name.startswith("part-")]
    rows = [r for f in files for r in pq.read_table(f, filesystem=fs).to_pylist()]
    assert len(rows) == len({r["id"] for r in rows}), "an id appears twice"
    return {r["id"]: r for r in rows}


def test_a_run_reads_prompts_from_s3_writes_parquet_there_and_resumes(s3, tmp_path):
    model, _ = demo_assets()
    options = RunOptions(model=model, input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/out",
                         sampling=SamplingParams(max_new_tokens=3))
    summary = run(options)
    assert summary.rows == 6 and summary.errors == 0 and str(summary.output) == f"s3://{BUCKET}/out"
    out = outputs("out")
    assert set(out) == {p["id"] for p in PROMPTS}
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"out/{output_dir.MANIFEST}")["Body"].read())
    assert manifest["input"] == f"s3://{BUCKET}/in"

    # the same rows, from local files: identical completions
    local = tmp_path / "in"
    (local / "more").mkdir(parents=True)
    for key in ("in/a.jsonl", "in/more/b.csv"):
        (tmp_path / key).write_bytes(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    run(RunOptions(model=model, input=local, output=tmp_path / "out", sampling=SamplingParams(max_new_tokens=3)))
    here = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert {i: r["completion_token_ids"] for i, r in out.items()} == \
           {i: r["completion_token_ids"] for i, r in here.items()}

    again = run(options)  # the same command resumes: nothing left to do
    assert again.rows == 0 and again.resumed == 6
    other = RunOptions(model=model, input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/out",
                       sampling=SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="holds another run's output"):
        run(other)
    s3.put_object(Bucket=BUCKET, Key="out/notes.txt", Body=b"the user's own")
    said = []
    assert run(replace_overwrite(other), echo=said.append).rows == 6
    assert s3.get_object(Bucket=BUCKET, Key="out/notes.txt")["Body"].read() == b"the user's own"
    assert any("`overwrite`: removed" in line and "1 other entry left" in line for line in said), said
    assert {r["completion_tokens"] for r in outputs("out").values()} <= {1, 2}


def replace_overwrite(options: RunOptions) -> RunOptions:
    from dataclasses import replace

    return replace(options, overwrite=True)


def test_an_output_inside_an_s3_input_prefix_is_refused(s3):
    model, _ = demo_assets()
    with pytest.raises(ValueError, match="is inside the input directory"):
        output_dir.check_locations(f"s3://{BUCKET}/in/out", f"s3://{BUCKET}/in", model)
    with pytest.raises(ValueError, match="holds the input"):
        output_dir.check_locations(f"s3://{BUCKET}", f"s3://{BUCKET}/in/a.jsonl", model)
    output_dir.check_locations(f"s3://{BUCKET}/in-out", f"s3://{BUCKET}/in", model)  # a sibling prefix is fine

"""The whole pipeline on a local Ray cluster (CPU): replicas of T ShardWorker actors, Parquet out."""

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.sequence import SamplingParams
from shardgen.actors.model.tokenizer import load_tokenizer
from shardgen.pipeline.options import RunOptions, read_json_schema
from shardgen.pipeline.run import run
from tests.helpers import hf_greedy, model_with_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def read_output(path: Path) -> dict[str, dict]:
    rows = pads.dataset(sorted(str(p) for p in path.glob("part-*.parquet")), format="parquet").to_table().to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id appears twice"
    return {r["id"]: r for r in rows}


def input_ids(path: Path) -> set[str]:
    return {json.loads(line)["id"] for line in path.read_text().splitlines()}


def test_every_id_exactly_once_with_two_replicas_and_with_tp2(demo, tmp_path):
    model, prompts = demo
    base = RunOptions(model=model, input=prompts, output=tmp_path / "r2t1", replicas=2, tp=1, batch_size=16,
                      sampling=SamplingParams(max_new_tokens=16))
    a = run(base)
    b = run(replace(base, output=tmp_path / "r1t2", replicas=1, tp=2))
    want = input_ids(prompts)
    assert len(want) == 200 and a.rows == b.rows == 200 and a.errors == b.errors == 0
    out_a, out_b = read_output(tmp_path / "r2t1"), read_output(tmp_path / "r1t2")
    assert set(out_a) == set(out_b) == want
    same = sum(out_a[i]["completion_token_ids"] == out_b[i]["completion_token_ids"] for i in want)
    print(f"R=2xT=1 vs R=1xT=2 greedy completions identical for {same}/200 rows; "
          f"{a.generated_tokens / a.wall_s:.0f} and {b.generated_tokens / b.wall_s:.0f} generated tokens/s")
    assert same == 200

    meta = pq.read_schema(next((tmp_path / "r1t2").glob("part-*.parquet"))).metadata
    assert meta[b"shardgen.dtype"] == b"float32" and meta[b"shardgen.tp"] == b"2"  # what ran, not "auto"


@pytest.mark.parametrize("family,tp", [("llama", 1), ("llama", 2), ("qwen3", 1), ("qwen3", 2), ("opt", 1)])
def test_greedy_completions_equal_transformers_generate(tmp_path, family, tp):
    reference, model = model_with_tokenizer(family, tmp_path)
    shared = "The quick brown fox jumps over the lazy dog. " * 4  # prefix caching: blocks shared when admitted later
    texts = ["def f(x):", "Hello, world", "int4 on Ray", "a", "The answer is 42.", "tensor parallel, T=2",
             "\n\n", "SELECT 1;", "zzz", "Once upon a time", shared + "Why?", shared + "How so?"]
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"p{i}", "prompt": t, **({"max_new_tokens": 4 + i} if i % 2 else {})}) + "\n")
    run(RunOptions(model=model, input=prompts, output=tmp_path / "out", tp=tp, batch_size=4,
                   sampling=SamplingParams(max_new_tokens=10, ignore_eos=True),
                   engine=EngineConfig(max_num_batched_tokens=32)))  # prompts in chunks, admitted over several steps
    out = read_output(tmp_path / "out")
    tokenizer = load_tokenizer(model)
    for i, t in enumerate(texts):
        want = hf_greedy(reference, tokenizer(t)["input_ids"], 4 + i if i % 2 else 10)
        assert out[f"p{i}"]["completion_token_ids"] == want, f"row p{i}"
        assert out[f"p{i}"]["completion"] == tokenizer.decode(want, skip_special_tokens=True)
        assert out[f"p{i}"]["finish_reason"] == "length" and out[f"p{i}"]["error"] is None


def test_seeded_sampling_is_reproducible_across_runs_and_layouts(demo, tmp_path):
    model, prompts = demo
    data = tmp_path / "in.jsonl"  # 64 rows: two batches of 32, over two replicas in run "c"
    data.write_text("".join(line + "\n" for line in prompts.read_text().splitlines()[:64]))
    base = RunOptions(model=model, input=data, output=tmp_path / "a", batch_size=32,
                      sampling=SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=5))
    outs = []
    for name, r, t in [("a", 1, 1), ("b", 1, 1), ("c", 2, 1), ("d", 1, 2)]:
        run(replace(base, output=tmp_path / name, replicas=r, tp=t))
        outs.append({k: v["completion_token_ids"] for k, v in read_output(tmp_path / name).items()})
    assert len(outs[0]) == 64 and outs[0] == outs[1] == outs[2] == outs[3]
    greedy_like = sum(len(set(v)) == 1 for v in outs[0].values())
    assert greedy_like < 16  # it really sampled


def test_n_samples_are_n_rows_of_a_row_reproducible_across_layouts_and_an_error_row_is_one(demo, tmp_path):
    """--n 3 with a row's own n (2) and two bad rows, at T=2 and at R=2: every (id, sample_index) once, the same
    sampled tokens both ways, one error row per bad row; a rerun resumes with nothing left to do."""

    model, prompts = demo
    rows = [json.loads(line) for line in prompts.read_text().splitlines()[:10]]
    rows[3]["n"] = 2
    rows[5]["n"] = 0
    rows[7]["prompt"] = None
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = RunOptions(model=model, input=data, output=tmp_path / "t2", tp=2, batch_size=4,
                      sampling=SamplingParams(max_new_tokens=8, temperature=0.9, seed=7, n=3))
    outs = []
    for name, r, t in (("t2", 1, 2), ("r2", 2, 1)):
        summary = run(replace(base, output=tmp_path / name, replicas=r, tp=t))
        table = pq.read_table(sorted((tmp_path / name).glob("part-*.parquet")))
        got = [(x["id"], x["sample_index"]) for x in table.to_pylist()]
        assert len(got) == len(set(got)) == summary.rows == 7 * 3 + 2 + 2 and summary.inputs == 10
        assert summary.errors == 2 and summary.prompt_tokens == sum(table.column("prompt_tokens").to_pylist()[i]
                                                                      for i, (_, k) in enumerate(got) if k == 0)
        outs.append({(x["id"], x["sample_index"]): (x["completion_token_ids"], x["error"]) for x in table.to_pylist()})
    assert outs[0] == outs[1]
    out = outs[0]
    assert {k for (i, k) in out if i == rows[3]["id"]} == {0, 1} and {k for (i, k) in out if i == rows[0]["id"]} == {0, 1, 2}
    assert "n must be an integer in [1, 1024], got 0" in out[(rows[5]["id"], None)][1]
    assert "prompt: empty or null" in out[(rows[7]["id"], None)][1]
    assert len({tuple(out[(rows[0]["id"], k)][0]) for k in range(3)}) > 1  # three different samples
    again = run(replace(base, replicas=1, tp=2))
    assert again.rows == 0 and again.resumed == 25


def test_an_openai_batch_file_answers_chat_and_completions_requests_by_custom_id(demo, tmp_path):
    """--input-format openai-batch: each request by its custom_id; a chat request through the model's chat template
    (the same tokens as --chat on its messages), a completions request as the plain prompt, n samples, and a line
    shardgen cannot answer as one error row naming it."""
    import shutil

    model, _ = demo
    chat_model = tmp_path / "model"
    shutil.copytree(model, chat_model)
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}"
                "<assistant>{% endif %}")
    (chat_model / "chat_template.jinja").write_text(template)
    messages = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "def add(a, b):"}]
    requests = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "demo", "messages": messages, "max_tokens": 6}},
        {"custom_id": "text-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "demo", "prompt": "import os", "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 1}},
        {"custom_id": "bad-1", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "logit_bias": {"7": 5}}},
    ]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in requests))
    summary = run(RunOptions(model=chat_model, input=batch, output=tmp_path / "out", input_format="openai-batch",
                             output_format="openai-batch", sampling=SamplingParams(max_new_tokens=16)))
    rows = pads.dataset(sorted(str(p) for p in (tmp_path / "out").glob("part-*.parquet"))).to_table().to_pylist()
    got = {(r["id"], r["sample_index"]): r for r in rows}
    assert set(got) == {("chat-1", 0), ("text-1", 0), ("text-1", 1), ("bad-1", None)} and summary.errors == 1
    assert "request 'bad-1': body.logit_bias: shardgen does not run logit_bias" in got[("bad-1", None)]["error"]
    assert got[("text-1", 0)]["completion_tokens"] == got[("text-1", 1)]["completion_tokens"] == 5
    from openai.types.chat import ChatCompletion

    lines = {x["custom_id"]: x for x in map(json.loads, (tmp_path / "out" / "openai-batch-output.jsonl").open())}
    assert set(lines) == {"chat-1", "text-1", "bad-1"} and lines["bad-1"]["error"]["code"] == "invalid_request"
    answer = ChatCompletion.model_validate(lines["chat-1"]["response"]["body"])
    assert answer.model == "demo" and answer.choices[0].message.content == got[("chat-1", 0)]["completion"]
    assert len(lines["text-1"]["response"]["body"]["choices"]) == 2
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"id": "chat-1", "prompt": json.dumps(messages), "max_new_tokens": 6}) + "\n")
    # the demo model has no template of its own: --chat-template gives it the same one
    run(RunOptions(model=model, input=plain, output=tmp_path / "plain", chat=True, chat_template=template,
                   sampling=SamplingParams(max_new_tokens=16)))
    want = read_output(tmp_path / "plain")["chat-1"]
    assert got[("chat-1", 0)]["completion_token_ids"] == want["completion_token_ids"]
    toks = load_tokenizer(chat_model).apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    toks = toks["input_ids"] if hasattr(toks, "keys") else toks  # transformers 5 returns a BatchEncoding
    assert got[("chat-1", 0)]["prompt_tokens"] == want["prompt_tokens"] == len(toks)


def test_structured_outputs_hold_for_every_row_and_a_rows_own_constraint_replaces_the_runs(demo, tmp_path):
    """--json-schema for every row, a row's own regex or choice instead, n samples of each, and a regex that does not
    compile as that row's error row; at T=2, so rank 0's masks steer a sharded model."""
    import re

    model, _ = demo
    schema = {"type": "object", "properties": {"lang": {"enum": ["py", "rs", "go"]}, "ok": {"type": "boolean"}},
              "required": ["lang", "ok"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    rows = [{"id": "a", "prompt": "def f(x):"}, {"id": "b", "prompt": "import os"},
            {"id": "c", "prompt": "x =", "regex": "[0-9]{1,3}(\\.[0-9]{1,2})?"},
            {"id": "d", "prompt": "# yes or no?", "choice": ["yes", "no"]},
            {"id": "e", "prompt": "y =", "regex": "(unclosed"}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run(RunOptions(model=model, input=data, output=tmp_path / "out", tp=2,
                             sampling=SamplingParams(max_new_tokens=48, temperature=0.9, seed=2, n=2,
                                                     json_schema=read_json_schema(tmp_path / "schema.json"))))
    out = pads.dataset(sorted(str(p) for p in (tmp_path / "out").glob("part-*.parquet"))).to_table().to_pylist()
    by_id = {}
    for r in out:
        by_id.setdefault(r["id"], []).append(r)
    assert summary.rows == 4 * 2 + 1 and summary.errors == 1 and "regex: not a valid regex" in by_id["e"][0]["error"]
    for r in by_id["a"] + by_id["b"]:
        value = json.loads(r["completion"])
        assert set(value) == {"lang", "ok"} and value["lang"] in ("py", "rs", "go") and r["finish_reason"] == "stop"
    assert all(re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,2})?", r["completion"]) for r in by_id["c"]), by_id["c"]
    assert all(r["completion"] in ("yes", "no") for r in by_id["d"])


def test_inputs_without_an_id_column_get_stable_file_and_row_ids_and_their_other_columns_come_through(demo, tmp_path):
    model, _ = demo
    data = tmp_path / "in"
    data.mkdir()
    (data / "a.csv").write_text("prompt,max_new_tokens,topic\nhello,3,greeting\nworld,4,\n")
    (data / "b.jsonl").write_text('{"prompt": "x", "topic": 5}\n{"prompt": null}\n{"prompt": "y", "top_p": 2}\n')
    options = RunOptions(model=model, input=data, output=tmp_path / "out", sampling=SamplingParams(max_new_tokens=5),
                         single_file=tmp_path / "all.parquet")
    summary = run(options)
    out = read_output(tmp_path / "out")
    assert set(out) == {"a.csv:0", "a.csv:1", "b.jsonl:0", "b.jsonl:1", "b.jsonl:2"}
    assert {i: r["topic"] for i, r in out.items()} == {"a.csv:0": "greeting", "a.csv:1": "", "b.jsonl:0": "5",
                                                       "b.jsonl:1": None, "b.jsonl:2": None}
    ordered = pq.read_table(tmp_path / "all.parquet")  # --single-file: the same rows in input order
    assert ordered.column("id").to_pylist() == sorted(out) and ordered.column_names[-1] == "topic"
    assert summary.rows == 5 and summary.errors == 2
    assert out["a.csv:0"]["completion_tokens"] == 3 and out["a.csv:1"]["completion_tokens"] == 4
    assert out["b.jsonl:1"]["finish_reason"] == "error" and "prompt: empty or null" in out["b.jsonl:1"]["error"]
    assert "top_p must be in (0, 1]" in out["b.jsonl:2"]["error"] and out["b.jsonl:2"]["completion"] is None
    run(replace(options, overwrite=True))
    assert set(read_output(tmp_path / "out")) == set(out)


def test_ids_come_out_exactly_as_the_files_wrote_them(demo, tmp_path):
    model, _ = demo
    data = tmp_path / "in"
    data.mkdir()
    (data / "a.csv").write_bytes("\ufeffid,prompt\n007,hello\n0009,world\n".encode())  # as Excel saves it
    (data / "b.jsonl").write_text('{"id": 7, "prompt": "x"}\n{"id": "07", "prompt": "y"}\n{"id": 1e3, "prompt": "z"}\n')
    options = RunOptions(model=model, input=data, output=tmp_path / "out", sampling=SamplingParams(max_new_tokens=2))
    assert run(options).rows == 5
    assert set(read_output(tmp_path / "out")) == {"007", "0009", "7", "07", "1e3"}


def test_a_rerun_resumes_and_a_different_run_is_refused_without_overwrite(demo, tmp_path):
    model, prompts = demo
    options = RunOptions(model=model, input=prompts, output=tmp_path / "out", sampling=SamplingParams(max_new_tokens=2))
    first = run(options)
    assert first.rows == 200 and first.layout == "cpu-dequantized"
    again = run(options)
    assert again.rows == 0 and again.resumed == 200
    assert again.layout == "nothing written"  # the summary speaks of this run's files only
    other = replace(options, sampling=SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match=r"holds another run's output \(\d+ part files; what differs, that run -> "
                                         r"this one: sampling.max_new_tokens: \d+ -> 3\); rerun that run's "
                                         r"command to resume it, pass `overwrite` to replace it"):
        run(other)
    (tmp_path / "out" / "notes.txt").write_text("the user's own")
    said = []
    assert run(replace(other, overwrite=True), echo=said.append).rows == 200
    assert len(read_output(tmp_path / "out")) == 200
    assert (tmp_path / "out" / "notes.txt").read_text() == "the user's own"  # --overwrite removes only shardgen's files
    assert any(line.startswith("shardgen: `overwrite`: removed ") and "_shardgen_run.json); 1 other entry left as "
               "they were" in line for line in said), said
    assert json.loads((tmp_path / "out" / "_shardgen_run.json").read_text())["sampling"]["max_new_tokens"] == 3


def test_duplicate_ids_in_an_input_too_big_for_the_driver_are_refused_naming_them(demo, tmp_path, monkeypatch):
    """The distributed check (IdShard actors), which inputs above LOCAL_ID_CHECK_BYTES take; small ones are checked
    in the driver (tests/pipeline/test_errors.py)."""
    from shardgen.pipeline import resume

    monkeypatch.setattr(resume, "LOCAL_ID_CHECK_BYTES", 0)
    model, _ = demo
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": "x"}) + "\n" for i in ["a", "b", "a", "c", "b", "d"]))
    with pytest.raises(ValueError, match=r"the id column 'id' repeats ids, e.g. \['a', 'b'\]"):
        run(RunOptions(model=model, input=data, output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_worker_killed_mid_job_is_replaced_and_every_id_comes_out_once(demo, tmp_path):
    """SIGKILL rank 1 of a T=2 replica while batches are in flight: the replica is rebuilt, its batches rerun,
    and the output equals an uninterrupted run's."""
    import os
    import signal
    import threading
    import time

    import psutil

    model, prompts = demo
    options = RunOptions(model=model, input=prompts, output=tmp_path / "calm", tp=2, batch_size=8,
                         sampling=SamplingParams(max_new_tokens=24))
    calm = run(options)
    hurt_dir = tmp_path / "hurt"
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run(replace(options, output=hurt_dir))))
    job.start()
    deadline = time.monotonic() + 300
    while not list(hurt_dir.glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "ShardWorker" in " ".join(p.info["cmdline"] or [])]
    followers = [p for p in workers if "generate" not in " ".join(p.info["cmdline"] or [])]
    victim = (followers or workers)[0]
    os.kill(victim.pid, signal.SIGKILL)
    written_before = len(read_output(hurt_dir))
    job.join(timeout=600)
    assert not job.is_alive(), "the job hung after a worker died"
    hurt = read_output(hurt_dir)
    calm_rows = read_output(tmp_path / "calm")
    print(f"killed {' '.join(victim.info['cmdline'])[:40]!r} (pid {victim.pid}) after {written_before} rows were "
          f"written; finished with {len(hurt)} rows, {result['summary'].errors} errors")
    assert written_before < 200
    assert set(hurt) == set(calm_rows) == input_ids(prompts) and result["summary"].errors == calm.errors == 0
    assert all(hurt[i]["completion_token_ids"] == calm_rows[i]["completion_token_ids"] for i in hurt)


def test_a_generate_actor_killed_after_writing_part_of_its_batch_is_restarted_and_every_id_comes_out_once(
        demo, tmp_path, monkeypatch):
    """SIGKILL the generate stage's actor once it has flushed some rows of its one batch (all 200 rows): Ray
    restarts it and sends the batch again, and the restarted stage leaves out the rows already written. (The
    engine's timing is deterministic enough here that a re-flush of the same rows would land on the same
    digest-named file anyway: stages/test_generate.py checks the leaving-out itself.)"""
    import functools
    import os
    import signal
    import threading
    import time

    import psutil

    from shardgen.pipeline.stages import generate

    model, prompts = demo
    # flushes every second: rows finish long before their 200-row batch does
    monkeypatch.setattr(generate, "Flush", functools.partial(generate.Flush, seconds=1.0))
    options = RunOptions(model=model, input=prompts, output=tmp_path / "out", batch_size=200,
                         sampling=SamplingParams(max_new_tokens=24))
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run(options)))
    job.start()
    deadline = time.monotonic() + 300
    while not list((tmp_path / "out").glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.1)
    written_before = len(read_output(tmp_path / "out"))
    (stage,) = [p for p in psutil.process_iter(["cmdline"]) if "GenerateStage" in " ".join(p.info["cmdline"] or [])]
    os.kill(stage.pid, signal.SIGKILL)
    job.join(timeout=600)
    assert not job.is_alive(), "the job hung after the generate actor died"
    out = read_output(tmp_path / "out")  # each id once
    print(f"killed the generate actor after {written_before} of 200 rows were written")
    assert 0 < written_before < 200
    assert set(out) == input_ids(prompts) and result["summary"].rows == 200 and result["summary"].errors == 0


def test_each_replica_holds_four_engine_waves_of_rows_within_rank0s_concurrency():
    from shardgen.actors.replica import RANK0_CONCURRENCY
    from shardgen.pipeline.processor import MIN_BATCHES_IN_FLIGHT, batches_in_flight

    assert batches_in_flight(64, 256) == 16  # the CLI defaults: 1,024 rows for an engine of 256 sequences
    assert batches_in_flight(128, 256) == 8
    assert batches_in_flight(100, 256) == 11  # rounded up: never fewer rows than four waves
    assert batches_in_flight(4096, 8) == MIN_BATCHES_IN_FLIGHT  # big batches: still several, so one's tail overlaps
    assert batches_in_flight(1, 256) == RANK0_CONCURRENCY  # more would only queue in front of rank 0


def test_a_small_input_is_shared_among_the_replicas_not_taken_by_the_first_one_ready():
    from shardgen.pipeline.processor import batches_in_flight

    assert batches_in_flight(8, 256, rows=64, replicas=2) == 4  # 8 batches: four each, not all eight to one
    assert batches_in_flight(8, 256, rows=65, replicas=2) == 5  # a ninth, partial batch rounds the share up
    assert batches_in_flight(8, 256, rows=3, replicas=4) == 1
    assert batches_in_flight(64, 256, rows=10**6, replicas=2) == 16  # a big input: the engine's depth
    assert batches_in_flight(64, 256, rows=None, replicas=2) == 16  # too big to count: the same


def test_an_engine_that_finishes_no_step_in_time_has_its_replica_rebuilt_then_stops_the_job(demo, tmp_path):
    """The health check's stall test end to end: with a step timeout no step can meet, every check finds rank 0's
    engine stalled, as it would a rank hung in a collective; the replica is rebuilt, and after 3 starts the job stops
    naming the timeout, keeping what was written."""
    model, prompts = demo
    options = RunOptions(model=model, input=prompts, output=tmp_path / "out", batch_size=200,
                         sampling=SamplingParams(max_new_tokens=64, ignore_eos=True),
                         engine=EngineConfig(step_timeout_s=1e-6, max_num_seqs=2))
    with pytest.raises(RuntimeError, match=r"the job stopped: a replica failed 3 times \(last: rank 0's engine "
                                           r"finished no step in \d+ s \(`step_timeout_s` 1e-06\): a rank is stuck"):
        run(options)

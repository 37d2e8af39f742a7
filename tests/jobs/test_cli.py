"""The shardgen command line, run as a user runs it (the installed console script, in a subprocess)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shardgen.actors.model.checkpoint import Checkpoint
from shardgen.actors.model.config import ModelConfig
from shardgen.actors.model.loader import load_model
from tests.helpers import ROOT, dequantized_reference, hf_model, save_hf, shardgen_logits



def shardgen(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "shardgen"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "shardgen.jobs.cli"]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env} if env else None)


def test_help_lists_commands_with_examples_and_starts_fast():
    start = time.perf_counter()
    r = shardgen("--help")
    elapsed = time.perf_counter() - start
    assert r.returncode == 0 and "quantize" in r.stdout and "run" in r.stdout
    assert "Example: shardgen quantize" in shardgen("quantize", "--help").stdout
    print(f"shardgen --help took {elapsed:.2f} s")


def test_quantize_round_trip_of_a_bf16_transformers_model(tmp_path):
    model = hf_model("qwen2", dtype=torch.bfloat16)
    src = save_hf(model, tmp_path / "src")
    (src / "tokenizer_config.json").write_text("{}")
    r = shardgen("quantize", str(src), str(tmp_path / "int4"), "--group-size", "64")
    assert r.returncode == 0, r.stderr
    assert "14 int4 weights (G=64)" in r.stdout  # 7 projections x 2 layers
    out = tmp_path / "int4"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_type"]["default"]["_data"] == {"group_size": 64, "int4_packing_format": "plain"}
    assert (out / "tokenizer_config.json").exists()
    with Checkpoint(out) as ckpt:
        assert ckpt.entry("model.layers.1.mlp.down_proj.weight").group_size == 64
        assert ckpt.entry("model.layers.1.mlp.down_proj.weight").dtype == torch.bfloat16
        assert not ckpt.entry("model.embed_tokens.weight").is_int4
        assert not ckpt.entry("lm_head.weight").is_int4
        assert not ckpt.entry("model.norm.weight").is_int4
    reference = dequantized_reference(model, out)
    ids = torch.randint(0, 301, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids).logits
    got = shardgen_logits(load_model(out).model, ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def test_quantize_keeps_layers_whose_k_is_not_a_multiple_of_g_in_float_and_says_so(tmp_path):
    src = save_hf(hf_model("llama", intermediate_size=96), tmp_path / "src")
    r = shardgen("quantize", str(src), str(tmp_path / "int4"), "--group-size", "64")
    assert r.returncode == 0, r.stderr
    assert "kept in float, cannot be grouped: model.layers.0.mlp.down_proj.weight (K=96" in r.stdout
    with Checkpoint(tmp_path / "int4") as ckpt:
        assert not ckpt.entry("model.layers.0.mlp.down_proj.weight").is_int4
        assert ckpt.entry("model.layers.0.mlp.gate_proj.weight").is_int4


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (None, ["quantize", "{tmp}/nope", "{tmp}/out"], "model directory {tmp}/nope does not exist"),
        ("float", ["quantize", "{tmp}/src", "{tmp}/src", "--overwrite"], "{tmp}/src is the source model {tmp}/src; write"),
        ("float", ["quantize", "{tmp}/src", "{tmp}", "--overwrite"], "{tmp} holds the source model {tmp}/src; write"),
        ("float", ["quantize", "{tmp}/src", "{tmp}/src/config.json"], "config.json is a file; give a directory"),
        ("small", ["quantize", "{tmp}/src", "{tmp}/out"], "no layer can be int4 at group size 128 (the decoder's linear "
                                                          "layers have K = [64, 96], and K must be a multiple of G); "
                                                          "pass --group-size 32"),
        ("float", ["quantize", "{tmp}/src", "{tmp}/out", "--group-size", "3"], "--group-size: int4 group size 3 is not"),
        ("float", ["quantize", "{tmp}/src", "{tmp}/out", "--group-size", "48"],
         "int4 group size 48 is not one shardgen runs; on the CPU: 32, 64, 128, 256; on CUDA: 64, 128, 256"),
        ("int4", ["quantize", "{tmp}/int4", "{tmp}/out"], "already quantized"),
    ],
)
def test_quantize_errors_name_what_to_fix(tmp_path, setup, args, message):
    if setup:
        small = {"hidden_size": 64, "intermediate_size": 96} if setup == "small" else {}
        src = save_hf(hf_model("llama", **small), tmp_path / "src")
        if setup == "int4":
            shardgen("quantize", str(src), str(tmp_path / "int4"), "--group-size", "32")
    r = shardgen(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    assert message.format(tmp=tmp_path) in r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "src" / "config.json").is_file() if setup else True  # the source model is untouched


def test_quantize_overwrite_replaces_the_checkpoint_and_nothing_else(tmp_path):
    src = save_hf(hf_model("llama"), tmp_path / "src")
    dst = tmp_path / "out"
    shutil.copytree(src, dst)
    (dst / "README.md").write_text("the user's notes")
    r = shardgen("quantize", str(src), str(dst), "--group-size", "32", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert f"--overwrite: removed 3 file(s) of the earlier checkpoint in {dst} (config.json, generation_config.json, " \
           "model.safetensors)" in r.stdout
    assert (dst / "README.md").read_text() == "the user's notes"
    with Checkpoint(dst) as ckpt:
        assert ckpt.entry("model.layers.0.self_attn.q_proj.weight").is_int4


@pytest.mark.slow
def test_run_with_no_arguments_runs_the_embedded_demo_and_prints_a_summary(tmp_path):
    exe = Path(sys.executable).parent / "shardgen"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    r = subprocess.run([str(exe), "run", "--max-new-tokens", "8"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    print(f"shardgen run (demo, from scratch) took {time.perf_counter() - start:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "shardgen run: 200 rows (0 errors) written to demo-output" in r.stdout
    assert "generated tokens/s" in r.stdout and "wall time" in r.stdout
    assert "--- demo-0000 ---\ndef __init__(self, optionalRelease" in r.stdout  # a sample completion follows
    assert (tmp_path / "demo-output").is_dir()
    # one progress line of shardgen's own on stderr (redirected: whole lines), none of Ray Data's or Ray's notices
    assert "shardgen: rows 200/200 (100%)" in r.stderr.splitlines()[-1], r.stderr[-2000:]
    assert "logging_progress" not in r.stderr and "Running Dataset" not in r.stderr, r.stderr[-2000:]
    assert "Token authentication" not in r.stderr, r.stderr[-2000:]
    assert "constructor arguments in the object store" not in r.stderr, r.stderr[-2000:]  # Ray's C++ noise


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--model", "x"], "pass both --model and --input, or neither"),
        (["run", "--model", "{demo}", "--input", "{tmp}/missing.jsonl", "--output", "{tmp}/o"], "--input {tmp}/missing.jsonl does not exist"),
        (["run", "--model", "{demo}", "--input", "{prompts}", "--output", "{tmp}/o", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["run", "--model", "{demo}", "--input", "{prompts}", "--output", "{tmp}/o", "--tp", "3"], "--tp 3 does not divide"),
        (["run", "--model", "{demo}", "--input", "{prompts}", "--output", "{tmp}/o", "--device", "tpu"], "--device must be one of"),
        (["run", "--model", "{demo}", "--input", "{prompts}", "--output", "{tmp}/o", "--prompt-column", "text"],
         "has no column 'text' (columns found: ['id', 'prompt', 'max_new_tokens'])"),
        (["run", "--model", "{demo}", "--input", "{prompts}"], "pass --output DIR"),
        (["run", "--model", "{demo}", "--input", "{prompts}", "--output", "{tmp}/o", "--json-schema", "{tmp}/s.json"],
         "--json-schema {tmp}/s.json does not exist; give a file holding one JSON Schema"),
        (["run", "--model", "{demo}", "--input", "{prompts}", "--output", "{tmp}/o", "--input-format", "openai"],
         "--input-format must be one of auto, openai-batch"),
        (["run", "--model", "{demo}", "--input", "{prompts}", "--output", "{tmp}/o", "--system-prompt", "Be brief."],
         "--system-prompt applies to chat prompts: pass --chat too"),
        (["run", "--model", "{demo}", "--input", "{prompts}", "--output", "{tmp}/o", "--chat", "--chat-template",
          "{tmp}/t.jinja"], "--chat-template {tmp}/t.jinja does not exist; give a Jinja chat template file"),
        (["inspect", "{tmp}"], "config.json is missing"),
        (["inspect", "{prompts}"], "{prompts} is a file; give the model's directory"),
    ],
)
def test_run_and_inspect_errors_name_what_to_fix(tmp_path, args, message):
    from shardgen.jobs.demo import demo_assets

    model, prompts = demo_assets()
    fmt = {"tmp": tmp_path, "demo": model, "prompts": prompts}
    r = shardgen(*[a.format(**fmt) for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert message.format(**fmt) in r.stderr
    assert "Traceback" not in r.stderr


def test_inspect_describes_the_checkpoint(tmp_path):
    from shardgen.jobs.demo import demo_assets

    model, _ = demo_assets()
    r = shardgen("inspect", str(model))
    assert r.returncode == 0, r.stderr
    assert "LlamaForCausalLM, 8 layers, hidden 256" in r.stdout
    assert "plain int4, group size 128; 56 int4 weights" in r.stdout
    assert "valid --tp: [1, 2]" in r.stdout


def test_quantize_and_inspect_a_mixture_of_experts_model(tmp_path):
    """shardgen quantize makes every expert's projections int4 and keeps the router float; inspect says so."""
    from shardgen.jobs.demo import build_byte_tokenizer

    src = save_hf(hf_model("qwen3_moe"), tmp_path / "moe")
    build_byte_tokenizer(src)
    r = shardgen("quantize", str(src), str(tmp_path / "moe-int4"), "--group-size", "32")
    assert r.returncode == 0, r.stderr
    r = shardgen("inspect", str(tmp_path / "moe-int4"))
    assert r.returncode == 0, r.stderr
    assert "Qwen3MoeForCausalLM, 2 layers" in r.stdout
    assert ("experts: 4 in each of 1 MoE layers, top 2 a token (renormalised), expert intermediate 64; "
            "12 int4 expert weights, routers float") in r.stdout  # 4 experts x gate, up, down


def test_a_model_id_runs_from_the_local_hugging_face_cache_and_a_missing_one_says_how_to_fetch_it(tmp_path):
    from shardgen.jobs.demo import demo_assets
    from tests.actors.model.test_hub import fake_hub_cache

    model, _ = demo_assets()
    cache = fake_hub_cache(tmp_path / "hub", "shardgen/demo-int4", model)
    r = shardgen("inspect", "shardgen/demo-int4", env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "LlamaForCausalLM, 8 layers, hidden 256" in r.stdout, r.stderr
    r = shardgen("inspect", "shardgen/missing", env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and f"not a model in the local Hugging Face cache ({cache}" in r.stderr
    assert "hf download shardgen/missing" in r.stderr and "Traceback" not in r.stderr


def _wrong_shape(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def _group_size_48(model: Path) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"]["quant_type"]["default"]["_data"]["group_size"] = 48
    (model / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit,message", [
    (_wrong_shape, "model.norm.weight has shape (7,) in the checkpoint, but config.json implies (256,)"),
    (lambda m: (m / "tokenizer.json").unlink(), "has no tokenizer files"),
    (_group_size_48, "int4 group size 48 is not one shardgen runs"),
])
def test_inspect_refuses_what_run_refuses(tmp_path, edit, message):
    from shardgen.jobs.demo import demo_assets

    model = Path(shutil.copytree(demo_assets()[0], tmp_path / "model"))
    edit(model)
    r = shardgen("inspect", str(model))
    assert r.returncode == 2 and message in r.stderr, r.stdout + r.stderr
    assert "valid --tp" not in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("bad", ["model", "input"])
def test_a_wrong_model_or_input_path_is_refused_before_torch_and_ray_load(tmp_path, bad):
    """Loading torch and Ray takes seconds; a mistyped path must not wait for them."""
    from shardgen.jobs.demo import demo_assets

    model, prompts = demo_assets()
    args = ["--model", str(tmp_path if bad == "model" else model), "--input",
            str(tmp_path / "missing.jsonl" if bad == "input" else prompts), "--output", str(tmp_path / "o")]
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom shardgen.jobs.cli import app\n"
            f"r = CliRunner().invoke(app, ['run', *{args!r}])\n"
            "print(r.exit_code, sorted({'torch', 'ray'} & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stdout.strip().splitlines()[-1] == "2 []", done.stdout + done.stderr


def test_a_relative_output_in_a_ray_job_is_refused_naming_where_it_would_go(tmp_path):
    """Under `ray job submit` the command runs in a copy of the working directory that Ray deletes later."""
    from shardgen.jobs.demo import demo_assets

    model, prompts = demo_assets()
    env = dict(os.environ, RAY_JOB_CONFIG_JSON_ENV_VAR='{"metadata": {}}')
    exe = Path(sys.executable).parent / "shardgen"
    r = subprocess.run([str(exe), "run", "--model", str(model), "--input", str(prompts), "--output", "rel-out"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"--output rel-out is relative, and a Ray job runs in a temporary copy of its --working-dir ({tmp_path})" \
        in r.stderr and not (tmp_path / "rel-out").exists()


def test_layers_kept_in_float_do_not_limit_tp_and_inspect_says_why_a_tp_is_invalid(tmp_path):
    """hidden 64 at G=128: o_proj (K=64) stays float, down_proj (K=256) is int4. --tp 2 splits o_proj's K to 32,
    which only an int4 o_proj would refuse; --tp 4 splits down_proj's K to 64 < G."""
    from shardgen.jobs.demo import build_byte_tokenizer

    src = save_hf(hf_model("llama", hidden_size=64, intermediate_size=256, num_key_value_heads=4), tmp_path / "src")
    build_byte_tokenizer(src)  # quantize copies it; inspect, as run, needs one
    r = shardgen("quantize", str(src), str(tmp_path / "int4"), "--group-size", "128")
    assert r.returncode == 0 and "o_proj.weight (K=64" in r.stdout, r.stdout + r.stderr
    r = shardgen("inspect", str(tmp_path / "int4"))
    assert r.returncode == 0, r.stderr
    assert "valid --tp: [1, 2]" in r.stdout
    assert "--tp 4: down_proj: row-parallel int4 slice K/T = 256/4 = 64 is not a multiple of the group size G = 128" in r.stdout
    assert "--tp 3: does not divide the attention heads (4) and KV heads (4)" in r.stdout
    with Checkpoint(tmp_path / "int4") as ckpt:
        groups = {e.name.rsplit(".", 1)[0]: e.group_size for e in ckpt.entries.values() if e.is_int4}
    ModelConfig.from_dir(tmp_path / "int4").check_tp(2, groups)  # what shardgen run checks


def test_ctrl_c_keeps_the_finished_rows_says_so_and_a_rerun_writes_every_id_exactly_once(tmp_path):
    """400 rows are all in flight at once (batches of 100, a replica holds 1,024), so no batch ends before the
    run's last seconds: only the generate stage's early writes (every 10 s) can put rows on disk by then."""
    import pyarrow.dataset as pads
    import signal

    from shardgen.jobs.demo import demo_assets

    model, prompts = demo_assets()
    rows = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i:03d}", "prompt": rows[i % len(rows)]["prompt"]}) + "\n"
                            for i in range(400)))
    out = tmp_path / "out"
    exe = Path(sys.executable).parent / "shardgen"
    args = [str(exe), "run", "--model", str(model), "--input", str(data), "--output", str(out), "--max-new-tokens", "32"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("part-*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)  # the first rows on disk, long before the first batch could be done
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr[-3000:]
    safe = pads.dataset(out, format="parquet").count_rows()
    assert 0 < safe < 400, safe
    assert f"interrupted: {safe:,} rows are safe in {out}" in stderr and "rerun the same command to resume" in stderr
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {safe:,} rows already in {out}" in again.stdout
    ids = pads.dataset(out, format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == [f"r{i:03d}" for i in range(400)]  # every id exactly once

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchao.prototype.safetensors.safetensors_support import (
    flatten_tensor_state_dict,
    unflatten_tensor_state_dict,
)

from shardgen.actors import int4
from shardgen.actors.model.checkpoint import Checkpoint
from shardgen.actors.model.checkpoint_writer import PlannedTensor, save_checkpoint
from tests.helpers import ROOT, synthetic_int4_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "model.layers.0.mlp.down_proj.weight": int4.quantize(torch.randn(64, 256, dtype=torch.bfloat16), 64),
        "model.layers.0.self_attn.q_proj.weight": int4.quantize(torch.randn(128, 128, dtype=torch.bfloat16), 32),
        "model.norm.weight": torch.randn(128, dtype=torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(100, 128),
    }


def _save(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 2**30) -> list[Path]:
    return save_checkpoint(directory, [PlannedTensor.of(n, t) for n, t in tensors.items()], max_shard_bytes)


def test_written_metadata_is_what_torchao_flatten_writes(tmp_path):
    tensors = _tensors()
    (path,) = _save(tmp_path, tensors)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    _, torchao_meta = flatten_tensor_state_dict(tensors)
    assert meta.pop("format") == "pt"
    assert meta == torchao_meta


def test_torchao_unflatten_reads_back_shardgen_files(tmp_path):
    tensors = _tensors()
    (path,) = _save(tmp_path, tensors)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    result, leftover = unflatten_tensor_state_dict(load_file(path), meta)
    assert not leftover
    for name, t in tensors.items():
        got = result[name]
        assert type(got) is type(t)
        if int4.is_int4(t):
            assert got.block_size == t.block_size and got.shape == t.shape
            assert torch.equal(got.qdata, t.qdata) and torch.equal(got.scale, t.scale)
        else:
            assert torch.equal(got, t)


def test_shardgen_reads_files_written_by_torchao_and_safetensors(tmp_path):
    tensors = _tensors()
    data, meta = flatten_tensor_state_dict(tensors)
    save_file(data, tmp_path / "model.safetensors", metadata={**meta, "format": "pt"})
    with Checkpoint(tmp_path) as ckpt:
        assert set(ckpt.names()) == set(tensors)
        for name, t in tensors.items():
            got = ckpt.read(name)
            if int4.is_int4(t):
                assert ckpt.entry(name).group_size == t.block_size[1]
                assert torch.equal(int4.dequantize(got), int4.dequantize(t))
            else:
                assert torch.equal(got, t)


def test_sharded_checkpoint_has_an_index_and_reads_back(tmp_path):
    tensors = _tensors()
    files = _save(tmp_path, tensors, max_shard_bytes=20_000)
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert "model.layers.0.mlp.down_proj._weight_qdata" in index["weight_map"]
    with Checkpoint(tmp_path) as ckpt:
        assert set(ckpt.names()) == set(tensors)
        q = tensors["model.layers.0.self_attn.q_proj.weight"]
        assert torch.equal(int4.dequantize(ckpt.read("model.layers.0.self_attn.q_proj.weight")), int4.dequantize(q))


@pytest.mark.parametrize("dim", [0, 1])
def test_slice_reads_equal_in_memory_shards(tmp_path, dim):
    tensors = _tensors()
    _save(tmp_path, tensors)
    name = "model.layers.0.mlp.down_proj.weight"
    with Checkpoint(tmp_path) as ckpt:
        for rank in range(2):
            size = tensors[name].shape[dim] // 2
            got = ckpt.read(name, dim, rank * size, size)
            want = int4.shard(tensors[name], dim, rank, 2)
            assert got.qdata.is_contiguous() and got.scale.is_contiguous()
            assert torch.equal(got.qdata, want.qdata) and torch.equal(got.scale, want.scale)
            assert torch.equal(got.zero_point, want.zero_point)
        dense = ckpt.read("model.embed_tokens.weight", 0, 50, 50)
        assert torch.equal(dense, tensors["model.embed_tokens.weight"][50:])


def test_pickle_only_checkpoint_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle weights.*safetensors only"):
        Checkpoint(tmp_path)


def test_allow_pickle_reads_a_pytorch_state_dict_with_weights_only(tmp_path):
    tensors = _tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with Checkpoint(tmp_path, allow_pickle=True) as ckpt:
        assert set(ckpt.names()) == set(tensors)
        got = ckpt.read("model.layers.0.mlp.down_proj.weight", 1, 128, 128)
        want = int4.shard(tensors["model.layers.0.mlp.down_proj.weight"], 1, 1, 2)
        assert torch.equal(got.qdata, want.qdata) and torch.equal(got.scale, want.scale)
        assert torch.equal(ckpt.read("model.norm.weight"), tensors["model.norm.weight"])


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_a_pickle_that_would_run_code_is_refused_even_when_pickles_are_allowed(tmp_path):
    torch.save({"w": torch.zeros(1), "payload": _RunsCode()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"cannot be read with torch.load\(weights_only=True\) \(Unsupported global: GLOBAL print.*could run code"):
        Checkpoint(tmp_path, allow_pickle=True)


def test_truncated_safetensors_file_is_named(tmp_path):
    (path,) = _save(tmp_path, _tensors())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Checkpoint(tmp_path)


def test_index_pointing_outside_the_model_directory_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(ValueError, match="outside the model directory"):
        Checkpoint(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    _save(tmp_path, _tensors())
    with Checkpoint(tmp_path) as ckpt, pytest.raises(ValueError, match="lm_head.weight.*missing"):
        ckpt.read("lm_head.weight")


@pytest.mark.slow
def test_a_rank_loading_its_slice_peaks_near_the_slice_not_the_checkpoint(tmp_path):
    """Measured in a fresh process: peak RSS (VmHWM) growth while building and loading rank 0's model."""
    total = synthetic_int4_checkpoint(tmp_path / "ckpt", hidden=2048, intermediate=8192, layers=12,
                                      vocab=8000, heads=16, kv_heads=4)
    script = textwrap.dedent(
        """
        import json, sys, torch
        from shardgen.actors.model.checkpoint import Checkpoint
        from shardgen.actors.model.config import ModelConfig
        from shardgen.actors.model.distributed import TPGroup
        from shardgen.actors.model.model import CausalLM

        def kib(key):
            return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

        path, tp = sys.argv[1], int(sys.argv[2])
        cfg = ModelConfig.from_dir(path)
        base = kib("VmHWM")
        with Checkpoint(path) as ckpt:
            groups = {e.name.rsplit(".", 1)[0]: e.group_size for e in ckpt.entries.values() if e.is_int4}
            model = CausalLM(cfg, TPGroup(0, tp), torch.bfloat16, "cpu", groups)
            model.load_weights(ckpt)
            largest = max(e.shape[0] * e.shape[-1] * (0.5 if e.is_int4 else 2) for e in ckpt.entries.values())
        local = 0
        for p in model.parameters():
            t = p.data
            local += sum(getattr(t, n).nbytes for n in ("qdata", "scale", "zero_point")) if hasattr(t, "qdata") else t.nbytes
        print(json.dumps({"peak": kib("VmHWM") - base, "local": local, "largest": largest}))
        """
    )
    for tp in (1, 2, 4):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt"), str(tp)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"TP={tp}: checkpoint {total / 2**20:.0f} MiB, rank 0 slice {r['local'] / 2**20:.0f} MiB, "
              f"peak RSS growth while loading {r['peak'] / 2**20:.0f} MiB")
        assert abs(r["local"] - total / tp) < 0.05 * total  # the rank holds its 1/T share
        # The slice itself plus one tensor in flight (a merged layer is assembled from its parts), plus allocator
        # slack: no file pages stay counted, reads are not mapped.
        assert r["peak"] < r["local"] + r["largest"] + 48 * 2**20
        # Well under the whole checkpoint: its 1/T share plus at most a fifth of it in flight.
        if tp > 1:
            assert r["peak"] < (1 / tp + 0.2) * total


def test_slices_read_from_the_file_equal_safetensors_own_slices(tmp_path, monkeypatch):
    """Reads are positioned file reads at the header's offsets (no mapping, no header parsed per read): every
    stored key, whole and cut along each dim, equals what safetensors itself returns, including 1-D, 3-D (stacked
    experts) and 0-D tensors, and parts of rows read through chunks smaller than one row's worth."""
    from shardgen.actors.model import checkpoint

    tensors = {**_tensors(), "experts.w": torch.randn(4, 6, 10, dtype=torch.bfloat16), "scalar": torch.tensor(3.5)}
    (path,) = _save(tmp_path, tensors)
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 100)  # a few rows a chunk
    with Checkpoint(tmp_path) as ckpt, safe_open(str(path), "pt") as ref:
        opened = []
        monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **k: opened.append(a))
        spans = ckpt._spans[path]
        assert set(spans) == set(ref.keys())
        for key, span in spans.items():
            shape = span.shape
            cuts = [tuple(slice(None) for _ in shape)]
            for d, n in enumerate(shape):
                if n > 2:
                    cuts.append(tuple(slice(1, n - 1) if i == d else slice(None) for i in range(len(shape))))
            for index in cuts:
                want = ref.get_slice(key)[index] if shape else ref.get_tensor(key)
                got = span.read(path, index)
                assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (key, index)
        for name in ckpt.names():
            e = ckpt.entry(name)
            for dim in range(min(2, len(e.shape))):
                ckpt.read(name, dim, 0, e.shape[dim] // 2 if e.shape[dim] % 2 == 0 else e.shape[dim])
        assert not opened


def test_a_truncated_file_is_named_when_a_read_runs_past_its_end(tmp_path):
    (path,) = _save(tmp_path, _tensors())
    with Checkpoint(tmp_path) as ckpt:
        path.write_bytes(path.read_bytes()[:-64])
        with pytest.raises(ValueError, match="model.safetensors ends inside a tensor.*truncated"):
            for name in ckpt.names():
                ckpt.read(name)

"""What a plan resolves before anything runs: the batch size, the device, the int4 checks (the refusals of plan are
in test_errors.py, the cluster's size among them)."""

import pytest

from shardgen.actors.model.config import ModelConfig, QuantConfig
from shardgen.jobs.cli import as_flags
from shardgen.pipeline.options import RunOptions
from shardgen.pipeline.plan import auto_batch_size, check_int4, resolve_device

def test_the_default_batch_is_256_rows_or_small_enough_for_four_batches_a_replica():
    assert auto_batch_size(1_000_000, 2) == 256
    assert auto_batch_size(None, 1) == 256  # a text input too big to count
    assert auto_batch_size(1000, 1) == 250
    assert auto_batch_size(200, 2) == 25
    assert auto_batch_size(3, 4) == 1
    assert auto_batch_size(0, 1) == 1  # an input of only a header: still a valid batch size



def test_auto_device_is_cuda_on_a_cluster_with_gpus_and_cuda_without_them_is_refused():
    assert resolve_device("auto", 0) == "cpu" and resolve_device("auto", 2) == "cuda"
    assert resolve_device("cpu", 8) == "cpu"
    with pytest.raises(ValueError) as caught:
        resolve_device("cuda", 0)
    assert "--device cuda: the cluster has no CUDA GPU; use --device cpu" in as_flags(str(caught.value))


def test_a_group_size_cuda_gets_wrong_is_refused_on_cuda_and_runs_on_the_cpu(tmp_path):
    model = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
                                   "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "quantization_config": QuantConfig(32).to_hf_dict()})
    options = RunOptions(model=tmp_path, input=tmp_path, output=tmp_path / "out")
    check_int4(model, "cpu", options)  # the CPU runs G=32
    with pytest.raises(ValueError, match="int4 group size 32 cannot run on CUDA"):
        check_int4(model, "cuda", options)


def test_an_address_with_no_cluster_is_refused_naming_the_address(monkeypatch, tmp_path):
    import ray

    from shardgen.pipeline.plan import connect

    def no_cluster(address: str, **kwargs: object) -> None:  # what ray.init raises, after its retries
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    options = RunOptions(model=tmp_path, input=tmp_path / "in.jsonl", output=tmp_path / "out", address="10.0.0.9:6379")
    with pytest.raises(ValueError) as caught:
        connect(options)
    message = as_flags(str(caught.value))
    assert "--address 10.0.0.9:6379" in message and "ray start --head" in message

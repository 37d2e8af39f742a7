"""ModelConfig's tensor-parallel rule (which --tp values split the model) and the model directory's checks."""

import pytest

from shardgen.actors.model.config import ModelConfig, QuantConfig
from tests.helpers import llama_config


def test_tp_that_does_not_divide_kv_heads_is_refused_with_the_valid_choices():
    with pytest.raises(ValueError, match=r"`tp` 4 does not divide.*KV heads \(2\).*Valid `tp` for this model: \[1, 2\]"):
        llama_config().check_tp(4)


def test_tp_whose_row_parallel_slice_breaks_groups_is_refused():
    c = llama_config(num_attention_heads=4, num_key_value_heads=4, intermediate_size=768,
                     quantization_config=QuantConfig(128).to_hf_dict())
    c.check_tp(2)
    with pytest.raises(ValueError, match=r"down_proj.*768/4 = 192.*group size G = 128"):
        c.check_tp(4)


def test_missing_config_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        ModelConfig.from_dir(tmp_path)


def test_broken_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ModelConfig.from_dir(tmp_path)

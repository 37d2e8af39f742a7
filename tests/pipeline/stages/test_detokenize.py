"""The detokenize stage: text for every completion, the engine's own cut text for one a stop string ended."""

import pyarrow as pa

from shardgen.jobs.demo import build_byte_tokenizer
from shardgen.pipeline.stages.detokenize import DetokenizeStage


def test_completions_are_decoded_a_cut_one_keeps_the_engines_text_and_an_error_row_has_none(tmp_path):
    build_byte_tokenizer(tmp_path)
    stage = DetokenizeStage(str(tmp_path))
    tok = stage.tokenizer
    ids = [tok("no stop here", add_special_tokens=False)["input_ids"], tok("hello ", add_special_tokens=False)["input_ids"],
           [1, 2, 3]]
    batch = pa.table({"completion_token_ids": pa.array(ids, pa.list_(pa.int32())),
                      "completion_text": pa.array([None, "hello ", None], pa.string()),
                      "finish_reason": ["length", "stop", "error"]})
    out = stage(batch)
    assert out.column("completion").to_pylist() == ["no stop here", "hello ", None]
    assert out.column("completion_token_ids").to_pylist() == ids  # the ids are the engine's, untouched

"""The detokenize stage: completion text cut before a stop string, and token ids that agree with it."""

import pyarrow as pa

from shardgen.actors.engine.sequence import SamplingParams
from shardgen.jobs.demo import build_byte_tokenizer
from shardgen.pipeline.detokenize import DetokenizeStage


def _batch(tok, texts: list[str], params: SamplingParams, reasons: list[str]) -> pa.Table:
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return pa.table({"completion_token_ids": pa.array(ids, pa.list_(pa.int32())),
                     "completion_tokens": pa.array([len(i) for i in ids], pa.int32()),
                     "params": pa.array([params.to_json()] * len(texts), pa.string()),
                     "finish_reason": pa.array(reasons, pa.string())})


def test_a_completion_cut_at_a_stop_string_keeps_only_the_token_ids_of_its_text(tmp_path):
    build_byte_tokenizer(tmp_path)
    stage = DetokenizeStage(str(tmp_path))
    tok = stage.tokenizer
    params = SamplingParams(stop=("END",))
    out = stage(_batch(tok, ["hello END world", "no stop here", "bad"], params, ["stop", "length", "error"]))
    assert out.column("completion").to_pylist() == ["hello ", "no stop here", None]
    ids = out.column("completion_token_ids").to_pylist()
    assert tok.decode(ids[0]) == "hello " and tok.decode(ids[1]) == "no stop here"
    assert out.column("completion_tokens").to_pylist() == [len(ids[0]), len(ids[1]), len(ids[2])]
    assert len(ids[2]) == 3  # an error row's ids are left as they were

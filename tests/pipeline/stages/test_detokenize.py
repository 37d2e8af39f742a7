"""The detokenize stage: completion text cut before a stop string, and token ids that agree with it."""

import pyarrow as pa

from shardgen.actors.engine.sequence import SamplingParams
from shardgen.jobs.demo import build_byte_tokenizer
from shardgen.pipeline.columns import params_array
from shardgen.pipeline.stages.detokenize import DetokenizeStage, cut_at_stop


def _batch(tok, texts: list[str], params: SamplingParams, reasons: list[str]) -> pa.Table:
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return pa.table({"completion_token_ids": pa.array(ids, pa.list_(pa.int32())),
                     "completion_tokens": pa.array([len(i) for i in ids], pa.int32()),
                     "params": params_array([params] * len(texts)),
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


def test_the_earliest_of_several_stop_strings_cuts_and_a_row_without_stops_is_whole(tmp_path):
    build_byte_tokenizer(tmp_path)
    stage = DetokenizeStage(str(tmp_path))
    tok = stage.tokenizer
    out = stage(_batch(tok, ["a STOP b HALT c", "x HALT y STOP"], SamplingParams(stop=("HALT", "STOP")),
                       ["stop", "stop"]))
    assert out.column("completion").to_pylist() == ["a ", "x "]
    plain = stage(_batch(tok, ["keep STOP all"], SamplingParams(), ["length"]))
    assert plain.column("completion").to_pylist() == ["keep STOP all"]


def test_cut_at_stop_cuts_before_the_first_stop_string():
    assert cut_at_stop("one two three", ("three", "two")) == "one "
    assert cut_at_stop("one two", ("four",)) == "one two"
    assert cut_at_stop("stop first", ("stop",)) == ""

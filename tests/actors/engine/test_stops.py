"""Cutting a completion at its earliest stop string: the text before it, and the token ids wholly before it."""

from shardgen.actors.engine.stops import cut_at_stop, cut_completion, hits_stop, tail_tokens
from shardgen.jobs.demo import build_byte_tokenizer


def test_cut_at_stop_cuts_before_the_earliest_stop_string():
    assert cut_at_stop("one two three", ("three", "two")) == "one "
    assert cut_at_stop("a STOP b HALT c", ("HALT", "STOP")) == "a "
    assert cut_at_stop("one two", ("four",)) == "one two"
    assert cut_at_stop("stop first", ("stop",)) == ""


def test_a_cut_completion_keeps_only_the_token_ids_of_its_text(tmp_path):
    build_byte_tokenizer(tmp_path)
    from shardgen.actors.model.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tmp_path))
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    ids = tok("hello END world", add_special_tokens=False)["input_ids"]
    kept, text = cut_completion(ids, ("END",), decode)
    assert text == "hello " and decode(kept) == "hello " and kept == ids[: len(kept)]
    words = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731 -- tokens of several characters
    kept, text = cut_completion([1, 22, 333, 4], ("t333",), words)
    assert (kept, text) == ([1, 22], "t1 t22 ")


def test_the_tail_the_engine_decodes_holds_any_stop_string_ending_in_the_newest_token():
    stops = ("END", "a much longer stop")
    n = tail_tokens(stops)
    assert n >= len("a much longer stop")
    text = "x" * 50 + "a much longer stop"
    assert hits_stop(text[-n:], stops) and not hits_stop("x" * n, stops)

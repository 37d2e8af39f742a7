"""A run's summary counts this run's part files only, and names the layouts its replicas reported."""

from shardgen.pipeline.stages.write import existing_output, write_part
from shardgen.pipeline.storage import Location
from shardgen.pipeline.summary import summarise
from tests.helpers import output_block as rows


def test_rows_of_an_earlier_run_are_not_this_runs_and_the_layouts_are_the_replicas(tmp_path):
    write_part(tmp_path, rows(5), {})
    before = existing_output(tmp_path)
    write_part(tmp_path, rows(3), {})
    write_part(tmp_path, rows(2, "error"), {})
    s = summarise(Location.of(tmp_path), before, 2.0, "cuda", ["int4-preshuffled", "int4-preshuffled"], resumed=5)
    assert (s.rows, s.errors, s.files, s.prompt_tokens, s.generated_tokens) == (5, 2, 2, 9, 6)
    assert s.layout == "int4-preshuffled" and s.resumed == 5
    assert "5 rows (2 errors)" in s.lines()[0] and "5 rows were there already" in s.lines()[0]


def test_a_run_that_wrote_nothing_says_so():
    s = summarise(Location.of("/nonexistent-shardgen-out"), [], 1.0, "cpu", [], resumed=0)
    assert s.rows == 0 and s.layout == "nothing written"


def test_prompt_tokens_from_the_prefix_cache_are_counted_in_the_summary(tmp_path):
    before = existing_output(tmp_path)
    write_part(tmp_path, rows(10), {})
    s = summarise(Location.of(tmp_path), before, 1.0, "cpu", ["cpu-dequantized"], resumed=0, cached_prompt_tokens=24)
    assert "30 prompt (24, 80%, from the prefix cache)" in s.lines()[1]
    assert "from the prefix cache" not in summarise(Location.of(tmp_path), before, 1.0, "cpu", [], 0).lines()[1]


def test_n_samples_of_a_row_are_rows_of_their_own_that_computed_the_prompt_once(tmp_path):
    write_part(tmp_path, rows(4, samples=3), {})
    write_part(tmp_path, rows(1, "error"), {})
    s = summarise(Location.of(tmp_path), [], 1.0, "cpu", ["cpu-dequantized"], resumed=0)
    assert (s.rows, s.inputs, s.errors, s.prompt_tokens, s.generated_tokens) == (13, 5, 1, 4 * 3, 12 * 2)
    assert "13 rows (5 input rows, 1 errors)" in s.lines()[0]

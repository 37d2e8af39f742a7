"""The progress line counts what is on disk: rows and generated tokens of the part files a run writes."""

import io
import time

import pyarrow as pa
import pyarrow.parquet as pq

from shardgen.pipeline.progress import Progress, _duration
from shardgen.pipeline.stages.write import WriteStats


def part(output, name: str, tokens: list[int]) -> None:
    output.mkdir(exist_ok=True)
    pq.write_table(pa.table({"completion_tokens": pa.array(tokens, pa.int32()),
                             "prompt_tokens": pa.array([1] * len(tokens), pa.int32()),
                             "finish_reason": pa.array(["length"] * len(tokens))}), output / f"part-{name}.parquet")


def test_counts_only_the_part_files_written_after_it_started(tmp_path):
    part(tmp_path, "old", [5] * 10)  # a resumed run's earlier output
    progress = Progress(tmp_path, total_rows=8, stream=io.StringIO(), interactive=False)
    part(tmp_path, "a", [3, 4])
    part(tmp_path, "b", [1, 0, 2])
    (tmp_path / ".part-c.parquet.tmp").write_bytes(b"half written")  # not a part file yet
    progress.poll()
    assert (progress.rows, progress.written.completion_tokens, progress.written.files) == (5, 10, 2)
    progress.poll()  # nothing new: nothing counted twice
    assert (progress.rows, progress.written.completion_tokens, progress.written.files) == (5, 10, 2)


def test_line_says_rows_of_total_tokens_per_second_and_eta(tmp_path):
    progress = Progress(tmp_path, total_rows=200, stream=io.StringIO(), interactive=False)
    now = time.perf_counter()
    progress._started = now - 40
    progress._first_rows = (now - 10, 20)  # 30 rows in the 10 s since the first ones landed: 150 left take 50 s
    progress.written = WriteStats(rows=100, inputs=50, completion_tokens=3000)  # 2 samples a row
    progress.engine_tokens = 12000  # the engines are ahead of the files
    line = progress.line()
    assert line.startswith("shardgen: rows 50/200 (25%), 300 generated tok/s, 40 s elapsed, ETA 50 s"), line
    progress.total_rows = None  # an input too big to count: no total, no ETA
    assert progress.line().startswith("shardgen: rows 50, 300 generated tok/s") and "ETA" not in progress.line()


def test_generated_tokens_count_from_the_engines_before_any_row_is_written_and_no_eta_is_guessed(tmp_path):
    progress = Progress(tmp_path, total_rows=200, stream=io.StringIO(), interactive=False, tokens=lambda: 5000)
    progress._started = time.perf_counter() - 10
    progress.poll()
    line = progress.line()
    assert line.startswith("shardgen: rows 0/200 (0%), 500 generated tok/s, 10 s elapsed") and "ETA" not in line, line


def test_a_terminal_line_fits_the_terminals_width(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback: os.terminal_size((40, 24)))
    stream = io.StringIO()
    progress = Progress(tmp_path, total_rows=200, stream=stream, interactive=True)
    progress._show(progress.line(), end="")
    assert stream.getvalue().startswith("\rshardgen: rows 0/200") and len(stream.getvalue()) == 1 + 39


def test_redirected_output_gets_whole_lines_and_a_terminal_one_redrawn_line(tmp_path):
    for interactive in (False, True):
        out = tmp_path / str(interactive)
        stream = io.StringIO()
        progress = Progress(out, total_rows=3, stream=stream, interactive=interactive, interval_s=0.05,
                            poll_s=0.01).start()
        part(out, "a", [1, 2, 3])
        time.sleep(0.2)
        progress.stop()
        text = stream.getvalue()
        assert "rows 3/3 (100%)" in text.rstrip().rsplit("\r", 1)[-1].splitlines()[-1], text
        if interactive:
            assert text.count("\r") >= 2 and text.count("\n") == 1  # redrawn in place, one newline at the end
        else:
            assert "\r" not in text and len(text.splitlines()) >= 2


def test_durations_read_as_a_person_would_say_them():
    assert [_duration(s) for s in (4.4, 75, 3720)] == ["4 s", "1 min 15 s", "1 h 02 min"]

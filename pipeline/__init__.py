"""The Ray Data driver side of a run. As a Python API:

    from shardgen.pipeline.options import RunOptions
    from shardgen.pipeline.run import run

    summary = run(RunOptions(model=Path("model"), input="prompts.jsonl", output="out"))

``run(options)`` is ``execute(plan(options))`` (``pipeline/plan.py``, ``pipeline/run.py``).
"""

"""The Ray Data driver side. As a Python API (also as ``shardgen.build_processor`` and ``shardgen.run``):

    from shardgen.pipeline.processor import build_processor
    from shardgen.pipeline.options import ProcessorConfig, RunOptions
    from shardgen.pipeline.run import run

    out = build_processor(ProcessorConfig(model=Path("model")))(dataset)  # a Ray Dataset in, one out
    summary = run(RunOptions(model=Path("model"), input="prompts.jsonl", output="out"))  # files in, Parquet out

``run(options)`` is ``execute(plan(options))`` (``pipeline/plan.py``, ``pipeline/run.py``), the processor's stages
with resume and the writer around them (``pipeline/processor.py``).
"""

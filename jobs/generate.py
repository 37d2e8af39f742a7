"""Entry point for ``ray job submit``: the same options as ``shardgen run``, attached to the job's cluster.

    ray job submit --working-dir . -- python -m shardgen.jobs.generate --model DIR --input PATH --output DIR
"""

import typer

from shardgen.jobs.cli import run
from shardgen.jobs.process import run_then_exit

if __name__ == "__main__":
    run_then_exit(lambda: typer.run(run))

"""Entry point for ``ray job submit``: the same options as ``shardgen run``, attached to the job's cluster.

    ray job submit --working-dir . -- python -m jobs.generate --model DIR --input PATH --output DIR
"""

import typer

from jobs.cli import run

if __name__ == "__main__":
    typer.run(run)

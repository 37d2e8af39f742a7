"""Checks a ``shardgen run`` output directory: every input id exactly once, no errors, and the hardware layout and
TP degree recorded in the files' metadata (used for the multi-GPU end-to-end runs of the TP issue).

    python -m scripts.check_output OUTPUT_DIR INPUT.jsonl
"""

import json
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq


def main(output: Path, prompts: Path) -> None:
    want = [json.loads(line).get("id") for line in prompts.read_text().splitlines() if line.strip()]
    files = sorted(output.glob("part-*.parquet"))
    table = pq.read_table(files, columns=["id", "finish_reason", "completion_tokens"])
    got = Counter(table.column("id").to_pylist())
    meta = pq.read_schema(files[0]).metadata
    missing = [i for i in want if i is not None and got[i] == 0]
    repeated = [i for i, n in got.items() if n > 1]
    errors = table.column("finish_reason").to_pylist().count("error")
    print(f"{output}: {table.num_rows} rows in {len(files)} files for {len(want)} inputs; missing {len(missing)}, "
          f"repeated {len(repeated)}, errors {errors}; tp {meta[b'shardgen.tp'].decode()}, replicas "
          f"{meta[b'shardgen.replicas'].decode()}, layout {meta[b'shardgen.hardware_layout'].decode()}, "
          f"{sum(table.column('completion_tokens').to_pylist())} generated tokens")
    assert not missing and not repeated and table.num_rows == len(want), "every id exactly once"


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

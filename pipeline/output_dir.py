"""The output directory: where a run may write (never over what it reads), the run record that makes a rerun of
the same command a resume, and which files are shardgen's (the only ones an overwrite removes).

A run's options are written to ``_shardgen_run.json`` in the output; rerunning the same command resumes, anything
else is refused unless ``overwrite``.
"""

from __future__ import annotations

import fnmatch
import json

from shardgen.pipeline.storage import Location, Where

MANIFEST = "_shardgen_run.json"
PART_PREFIX = "part-"  # stages.write names its files so (not imported: write imports Ray Data)
OPENAI_BATCH_OUTPUT = "openai-batch-output.jsonl"  # output_format openai-batch (pipeline/openai_output.py)


def manifest(**fields: object) -> dict:
    """What makes two runs the same run (their completions are interchangeable)."""
    return json.loads(json.dumps(fields, default=str))


def read_manifest(output: Where) -> dict | None:
    path = Location.of(output).child(MANIFEST)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_manifest(output: Where, fields: dict) -> None:
    output = Location.of(output)
    output.make_dir()
    output.child(MANIFEST).write_bytes(json.dumps(fields, indent=2, sort_keys=True).encode())


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs, nested ones by their dotted path (``sampling.seed``)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(differences(a, b, f"{prefix}{k}."))
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def check_locations(output: Where, input: Where, model: Where) -> None:
    """Refuse an ``--output`` that would overwrite or feed on what the run reads: the input itself, a directory that
    holds the input or the model, or a directory inside the input directory (a rerun, the documented way to resume,
    would read its part files as prompts)."""
    out, inp, mod = Location.of(output), Location.of(input), Location.of(model)
    beside = f"{inp.text.rstrip('/').rsplit('.', 1)[0] if inp.suffix else inp.text}-out"
    if inp.within(out):
        raise ValueError(f"`output` {out} {'is' if out.path == inp.path else 'holds'} the input {inp}; choose an "
                         f"output directory of its own, e.g. {beside}")
    if out.within(inp) and inp.is_dir():
        raise ValueError(f"`output` {out} is inside the input directory {inp}: a rerun would read its part files "
                         f"as prompts; choose a directory outside it, e.g. {beside}")
    if mod.within(out):
        raise ValueError(f"`output` {out} {'is' if out.path == mod.path else 'holds'} the model {mod}; choose an "
                         f"output directory of its own")


def is_part_file(name: str) -> bool:
    return name.startswith(PART_PREFIX) and name.endswith(".parquet")


SHARDGEN_FILES = (f"{PART_PREFIX}*.parquet", f".{PART_PREFIX}*.tmp", MANIFEST, f".{MANIFEST}.tmp",
                  OPENAI_BATCH_OUTPUT, f".{OPENAI_BATCH_OUTPUT}.tmp")


def shardgen_files(output: Where) -> list[Location]:
    """What shardgen writes in an output directory: part files, their temporary names, the run record."""
    return [f for f in Location.of(output).files() if any(fnmatch.fnmatchcase(f.name, p) for p in SHARDGEN_FILES)]


def clear_output(output: Where) -> str | None:
    """``--overwrite``: delete what an earlier run wrote in ``output`` and nothing else; says what went (None if
    nothing did)."""
    output = Location.of(output)
    gone = shardgen_files(output)
    for p in gone:
        p.delete()
    if not gone:
        return None
    parts = sum(is_part_file(p.name) for p in gone)
    others = output.entries()
    kept = f"; {others} other entr{'y' if others == 1 else 'ies'} left as they were" if others else ""
    return (f"`overwrite`: removed {len(gone)} file(s) of an earlier run from {output} ({parts} part files"
            f"{', ' + MANIFEST if any(p.name == MANIFEST for p in gone) else ''}){kept}")


def plan_output(output: Location, fields: dict, overwrite: bool, part_files: list[Location]) -> list[Location]:
    """What to do with ``--output``: returns the finished part files to resume from (none for a fresh start).

    An output written by the same run (same manifest) is resumed; one written by anything else is refused
    unless ``overwrite``, which starts afresh (the caller removes the earlier run's files, ``clear_output``)."""
    if output.is_file():
        raise ValueError(f"`output` {output} is a file; give a directory")
    if overwrite or not output.is_dir():
        return []
    old = read_manifest(output)
    if old is None:
        if part_files or output.entries():
            raise ValueError(f"`output` {output} is not empty and holds no shardgen run ({len(part_files)} part files, "
                             f"no {MANIFEST}); choose another `output`, or pass `overwrite` to write there (it "
                             f"removes only shardgen's own files)")
        return []
    changed = differences(old, fields)
    if changed:
        raise ValueError(f"`output` {output} holds another run's output ({len(part_files)} part files; what differs, "
                         f"that run -> this one: {'; '.join(changed)}); rerun that run's command to resume it, pass "
                         f"`overwrite` to replace it, or choose another `output`")
    return part_files


def remove_partial_writes(output: Location) -> int:
    """Delete temporary files of writes a killed run left behind; returns how many."""
    partial = [f for f in shardgen_files(output) if f.name.endswith(".tmp")]
    for f in partial:
        f.delete()
    return len(partial)

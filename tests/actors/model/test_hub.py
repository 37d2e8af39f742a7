"""Model ids resolved through the local Hugging Face cache, offline; paths stay paths."""

import shutil
from pathlib import Path

import pytest

from shardgen.actors.model.hub import resolve_model


def fake_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """A hub cache holding ``model_dir``'s files as ``repo_id``'s main revision, laid out as huggingface_hub does."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    return cache


def test_a_cached_model_id_is_its_snapshot_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cache = fake_hub_cache(tmp_path / "hub", "org/tiny", tmp_path / "m")
    got = resolve_model("org/tiny", cache)
    assert got.is_dir() and (got / "config.json").read_text() == "{}" and "models--org--tiny" in str(got)


def test_paths_stay_paths_and_a_missing_id_says_where_shardgen_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert resolve_model("org/local", tmp_path / "hub") == Path("org/local")  # an existing directory wins
    for path in ("./x/y", "/abs/model", "a/b/c", "model"):
        assert resolve_model(path, tmp_path / "hub") == Path(path)
    with pytest.raises(FileNotFoundError, match=r"`model` org/absent is not a directory, and not a model in the local "
                                                r"Hugging Face cache \(.*hub; set by HF_HUB_CACHE or HF_HOME\).*"
                                                r"`hf download org/absent`"):
        resolve_model("org/absent", tmp_path / "hub")

"""The wheel that ``pip install`` builds from pyproject.toml holds every module and data file of the source tree
(an editable install, as ``make setup`` and cluster.yaml do, would hide a package left out of the list)."""

import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def _installed_name(path: str) -> str:
    """Where a repository file lands in the wheel: each top folder is mapped under ``shardgen`` (pyproject.toml's
    package-dir), and jobs/api is ``shardgen`` itself."""
    if path.startswith("jobs/api/"):
        return "shardgen/" + path.removeprefix("jobs/api/")
    return "shardgen/" + path


def test_the_wheel_holds_every_module_and_the_demo_models_files(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("shardgen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [p for top in ("actors", "pipeline", "jobs") for p in (ROOT / top).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts
               and (p.suffix == ".py" or "demo_model" in p.relative_to(ROOT).parts)]
    missing = sorted(str(p.relative_to(ROOT)) for p in sources
                     if _installed_name(str(p.relative_to(ROOT))) not in names)
    assert not missing, f"pyproject.toml's packages leave out: {missing[:10]}"

"""Fixtures shared across the test tree."""

from pathlib import Path

import pytest

from shardgen.jobs.demo import demo_assets


@pytest.fixture(scope="session")
def demo() -> tuple[Path, Path]:
    """(the embedded demo model's directory, its prompts file)."""
    return demo_assets()

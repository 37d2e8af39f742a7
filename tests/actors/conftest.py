"""Fixtures shared by the engine's tests."""

import pytest

from shardgen.actors.model.loader import load_model
from tests.helpers import int4_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(dequantized transformers reference, the loaded int4 tiny Llama): the engine tests' model."""
    reference, path = int4_checkpoint("llama", tmp_path_factory.mktemp("engine"), max_position_embeddings=512)
    return reference, load_model(path)

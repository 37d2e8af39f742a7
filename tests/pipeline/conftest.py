"""Fixtures shared by the pipeline's tests."""

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 8 logical CPUs for one test module (``pytest.mark.usefixtures("local_ray")``)."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()

"""Shared fixtures. ``ray_cluster``: one local Ray cluster per test module that asks for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def ray_cluster(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A local Ray cluster for the module (``ray.init(address="local")``), shut down after its last test.

    The module may set ``RAY_CPUS`` (default 2) and ``RAY_ENV``: environment variables set before the cluster
    starts, so its workers inherit them, and restored afterwards. Token authentication is off for these
    single-machine clusters only (Ray 2.60 turns it on by default; the product keeps it on)."""
    import ray

    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), **getattr(request.module, "RAY_ENV", {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(address="local", num_cpus=getattr(request.module, "RAY_CPUS", 2), include_dashboard=False,
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

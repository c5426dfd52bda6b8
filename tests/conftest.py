"""Shared fixtures. The suite runs offline with telemetry off, like the product."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bvpo.runtime import configure_environment

ROOT = Path(__file__).resolve().parent.parent
configure_environment(ROOT)
# Tests run many small torch ops while other processes (training subprocesses) are busy:
# spinning OpenMP threads would collapse throughput on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tokenizer():
    from bvpo.modeling import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from bvpo.modeling import build_tiny_model

    return build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                            max_length=192, seed=0)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch

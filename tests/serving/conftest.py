"""Fixtures of the serving tests (the bundle and its loaded model are the session fixtures of tests/conftest.py)."""

import pytest

from ariadne_hf.serving.app import LocalBackend, create_app
from ariadne_hf.serving.runner import ServerThread


@pytest.fixture(scope="module")
def server(serving_model):
    """`ariadne serve` in local mode over the shared serving model, on a free loopback port (max_batch_size=8,
    max_wait_ms=100); one per test module, so the /stats counters a test reads only count its own module's
    requests (tests compare them as before/after deltas)."""
    with ServerThread(create_app(LocalBackend(serving_model, max_batch_size=8, max_wait_ms=100))) as running:
        yield running

"""The local Ray environment defaults (no Ray needed): loopback switch, Serve budgets, user values win."""

from __future__ import annotations

from ariadne_hf.serving.ray_environment import LOCAL_RAY_ENVIRONMENT, prepare_local_ray_environment


def test_defaults_are_set_and_user_values_win(monkeypatch):
    for name in LOCAL_RAY_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "7")
    prepare_local_ray_environment()
    import os

    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "7"
    assert float(os.environ["RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"]) >= 60


def test_joining_an_existing_cluster_keeps_the_network_address(monkeypatch):
    for name in LOCAL_RAY_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    prepare_local_ray_environment()
    import os

    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    assert os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "60"

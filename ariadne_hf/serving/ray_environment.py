"""The environment of a local Ray instance started by `ariadne serve --ray` or the tests: loopback, patient checks.

Imports nothing of Ray: `prepare_local_ray_environment()` must run before Ray is first imported in this process,
because Ray reads these variables at import time (its driver decides the node address then) and its GCS, raylet and
Serve controller inherit them when `ray.init` spawns them.

- Loopback: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is Ray's own switch for a single-machine instance (the default on
  macOS/Windows): the node address becomes 127.0.0.1 and every Ray server (GCS, raylet, workers, dashboard agent)
  listens on loopback instead of the machine's network address. Verified with `ss -ltn` on Ray 2.60.
- Patience: Serve's proxy must answer a readiness check within 5 s three times in a row at start-up, which a busy
  2-core machine misses (`ActorDiedError` at `serve.start`). The budgets below hold on a loaded machine.

Every value is a default (`os.environ.setdefault`): a variable the user already set wins.
"""

from __future__ import annotations

import os
import sys

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

LOCAL_RAY_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-machine instance on 127.0.0.1
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",  # Ray's default 5
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",  # Ray's default 10
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "20",  # Ray's default 10
}

# Serve deployment options of the ingress and generator replicas (Ray's defaults: 30 s timeout, 10 s period)
DEPLOYMENT_HEALTH_CHECK = {"health_check_timeout_s": 120, "health_check_period_s": 20}


def prepare_local_ray_environment() -> bool:
    """Set the defaults above; returns True when they can still take full effect.

    Ray's internal servers bind to loopback even when Serve's HTTP proxy serves on 0.0.0.0 (a local instance never
    needs them reachable from outside). The loopback switch is not set when `RAY_ADDRESS` names an existing cluster
    to join (its nodes must see this one's network address). Returns False when Ray was already imported in this
    process: the Serve budgets still reach the processes `ray.init` spawns, but the driver has already chosen the
    node address (`start_ray` then warns).
    """
    for name, value in LOCAL_RAY_ENVIRONMENT.items():
        if name == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" and os.environ.get("RAY_ADDRESS"):
            continue
        os.environ.setdefault(name, value)
    return "ray" not in sys.modules

"""What `ariadne serve` calls: build the app of a mode (local, gateway, Ray) and serve it."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def require(*modules: str, extra: str) -> None:
    """Fail with the install command when an optional serving dependency is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"ariadne serve needs {', '.join(missing)}: pip install 'ariadne_hf[{extra}]'.")


def build_local_app(bundle: str, *, max_batch_size: int = 16, max_wait_ms: float = 10.0,
                    default_max_tokens: int = 256, revision: str | None = None, model=None):
    """The local server: the bundle loaded here (or `model`, already loaded), dynamic batching."""
    require("fastapi", "uvicorn", extra="serve")
    from .app import LocalBackend, create_app

    if model is None:
        from ..modeling_ariadne import AriadneRoutedModel

        model = AriadneRoutedModel.from_pretrained(bundle, **({"revision": revision} if revision else {}))
    return create_app(LocalBackend(model, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                   default_max_tokens=default_max_tokens))


def build_gateway_app(bundle: str, upstream: str, *, upstream_model: str = "{adapter}",
                      upstream_base_model: str = "base", upstream_api_key: str | None = None,
                      revision: str | None = None):
    """Gateway mode: the router only (no backbone layers, no adapters), generation on `upstream`."""
    require("fastapi", "uvicorn", "httpx", extra="serve")
    from .app import create_app
    from .gateway import GatewayBackend
    from .routing_only import load_routing_only

    router = load_routing_only(bundle, revision=revision)
    return create_app(GatewayBackend(router, upstream, model_template=upstream_model,
                                     base_model=upstream_base_model, api_key=upstream_api_key),
                      title="ariadne serve (gateway)")


def serve(bundle: str, *, host: str = "127.0.0.1", port: int = 8000, upstream: str | None = None,
          upstream_model: str = "{adapter}", upstream_base_model: str = "base", upstream_api_key: str | None = None,
          ray: bool = False, replicas: int = 2, adapters_per_replica: int = 4, max_batch_size: int = 16,
          max_wait_ms: float = 10.0, default_max_tokens: int = 256, revision: str | None = None) -> None:
    """Serve a bundle until interrupted, in one of three modes (see README, "Serving")."""
    if ray and upstream:
        raise ValueError("--ray and --upstream are separate modes; pick one.")
    if ray:
        require("ray", "fastapi", extra="ray")
        from .ray_app import run_forever

        run_forever(bundle, host=host, port=port, replicas=replicas, adapters_per_replica=adapters_per_replica,
                    max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, default_max_tokens=default_max_tokens)
        return
    from .runner import serve_forever

    if upstream:
        app = build_gateway_app(bundle, upstream, upstream_model=upstream_model,
                                upstream_base_model=upstream_base_model, upstream_api_key=upstream_api_key,
                                revision=revision)
    else:
        app = build_local_app(bundle, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                              default_max_tokens=default_max_tokens, revision=revision)
    serve_forever(app, host=host, port=port)

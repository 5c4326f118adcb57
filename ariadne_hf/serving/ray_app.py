"""Scale-out on Ray Serve: an ingress that routes, and generation replicas multiplexed by adapter.

- `Ingress` (FastAPI through `@serve.ingress`, the same OpenAI API as the local server via app.create_app) holds only
  the router (routing_only.py: tokenizer + embedding table + centroids, no backbone). It routes each request and calls
  the generation deployment with `handle.options(multiplexed_model_id=<adapter>)`, so Ray's router prefers replicas
  that already hold that adapter.
- `Generator` replicas each load the bundle with `max_resident_adapters=K`: their layers hold K adapters' LoRA
  weights, the rest stay in the bundle's files. `@serve.multiplexed(max_num_models_per_replica=K)` loading an adapter
  makes it resident (least recently used evicted); a replica's dynamic batches use at most K distinct adapters.
  Responses name the replica (`x-ariadne-replica`), the adapters resident in it when it answered
  (`x-ariadne-resident`) and whether the adapter was resident before the request (`x-ariadne-warm`).

Ray's multiplexed routing is best effort: a request may land on a replica that must first load its adapter (a slot
load from the memory-mapped file: milliseconds for a rank-8 adapter).
"""

from __future__ import annotations

import asyncio
import os
import socket
import warnings

from ..lora.residency import ResidencyError
from .engine import forced_adapter, request_prompts, route_id_lists
from .openai_params import IGNORED_HEADER, ignored_fields
from .prompts import pad_id_of, text_ids
from .protocol import ADAPTER_HEADER, ChatRequest, CompletionRequest, OpenAIError, public_name
from .ray_environment import DEPLOYMENT_HEALTH_CHECK, LOOPBACK_HOSTS, prepare_local_ray_environment

prepare_local_ray_environment()  # before Ray's first import: a local instance binds to 127.0.0.1 (ray_environment.py)

from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from ray import serve  # noqa: E402

REPLICA_HEADER = "x-ariadne-replica"
WARM_HEADER = "x-ariadne-warm"  # "1" when the replica already held the adapter before the request
RESIDENT_HEADER = "x-ariadne-resident"


class GeneratorReplica:
    """The body of one generation replica (`generator_deployment` adds Ray's deployment and multiplexing).

    Guarantees: the bundle is loaded with `max_resident_adapters=adapters_per_replica`, so the replica's layers hold
    at most that many adapters; the LocalEngine is created on first use, inside the replica's running loop; every
    answer carries the replica id, the adapters resident when it answered and whether the request's adapter was
    resident before it; a refused request is answered as {"error", "status", ...} instead of raising through Ray.
    """

    def __init__(self, bundle: str, *, adapters_per_replica: int, max_batch_size: int, max_wait_ms: float,
                 default_max_tokens: int):
        from ..modeling_ariadne import AriadneRoutedModel

        # the replica's layers hold only K adapters (resident slots); the rest stay in the bundle's files
        self.model = AriadneRoutedModel.from_pretrained(bundle, max_resident_adapters=adapters_per_replica)
        self.engine_options = dict(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                   default_max_tokens=default_max_tokens)
        self.engine = None
        self.resident: set[str] = set()
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def hold_adapter(self, adapter: str):
        """Overridden by the deployment with Ray's multiplexed version of `warm_adapter`."""
        return self.warm_adapter(adapter)

    def warm_adapter(self, adapter: str) -> _Warm:
        """Make `adapter` warm on this replica: load its LoRA weights into a slot now (least recently used
        evicted), so its requests find it resident."""
        if adapter in self.model.adapter_names:
            index = self.model.adapter_names.index(adapter)
            try:
                self.model.lora.acquire({index})
                self.model.lora.release({index})
            except ResidencyError:  # every slot pinned by running batches: the batch will load it itself
                pass
        return _Warm(adapter, self.resident)

    def _engine(self):
        if self.engine is None:  # created inside the replica's running loop (the batcher needs it)
            from .engine import LocalEngine

            self.engine = LocalEngine(self.model, **self.engine_options)
            self.engine.start()
        return self.engine

    async def _prepare(self, kind: str, body: dict):
        adapter = serve.get_multiplexed_model_id()
        warm = adapter in self.model.lora.resident()  # held before this request: a warm hit
        await self.hold_adapter(adapter)
        schema = ChatRequest if kind == "chat" else CompletionRequest
        request = schema.model_validate({**body, "model": adapter})
        return self._engine().prepare(kind, request), warm

    def _meta(self, warm: bool = False) -> dict:
        return {"replica": self.replica, "resident": sorted(self.model.lora.resident()), "warm": warm}

    async def generate(self, kind: str, body: dict) -> dict:
        try:
            prepared, warm = await self._prepare(kind, body)
            return {"body": await self._engine().collect(prepared), **self._meta(warm)}
        except OpenAIError as err:
            return {"error": err.body(), "status": err.status, **self._meta()}

    async def generate_stream(self, kind: str, body: dict):
        try:
            prepared, warm = await self._prepare(kind, body)
        except OpenAIError as err:
            yield {"error": err.body(), "status": err.status, **self._meta()}
            return
        yield self._meta(warm)
        async for event in self._engine().stream(prepared):
            yield event


def generator_deployment(bundle: str, *, replicas: int, adapters_per_replica: int, max_batch_size: int,
                         max_wait_ms: float, default_max_tokens: int, num_cpus: float = 1.0):
    """The generation deployment: `GeneratorReplica`s of `bundle` (a class built here so K reaches
    `serve.multiplexed` at definition time: Ray keeps at most K adapters warm per replica, LRU)."""

    @serve.deployment(name="AriadneGenerator", num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus},
                      max_ongoing_requests=4 * max_batch_size, **DEPLOYMENT_HEALTH_CHECK)
    class Generator(GeneratorReplica):
        def __init__(self):
            super().__init__(bundle, adapters_per_replica=adapters_per_replica, max_batch_size=max_batch_size,
                             max_wait_ms=max_wait_ms, default_max_tokens=default_max_tokens)

        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        async def hold_adapter(self, adapter: str):
            return self.warm_adapter(adapter)

    return Generator


class _Warm:
    """A multiplexed 'model': marks an adapter warm on a replica until Ray's LRU evicts it (then __del__ runs)."""

    def __init__(self, adapter: str, resident: set[str]):
        self.adapter, self.resident = adapter, resident
        resident.add(adapter)

    def __del__(self):
        self.resident.discard(self.adapter)


class RayBackend:
    """Backend of create_app inside the Ray ingress: route here, generate on the multiplexed Generator."""

    def __init__(self, router, generator):
        self.router, self.generator, self.tokenizer = router, generator, router.tokenizer
        self.adapter_names = list(router.adapter_names)
        self.pad_id = pad_id_of(self.tokenizer)
        self.counts = {"requests": 0}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def stats(self) -> dict:
        return {"mode": "ray", **self.counts}

    async def route(self, texts):
        return route_id_lists(self.router, [text_ids(self.tokenizer, t) for t in texts], self.pad_id)

    async def complete(self, kind: str, req, raw: dict) -> Response:
        self.counts["requests"] += 1
        forced = forced_adapter(req.model, self.adapter_names)
        if forced is None:
            routes = route_id_lists(self.router, request_prompts(kind, req, self.tokenizer), self.pad_id)
            adapters = {info.adapter for info in routes}
            if len(adapters) > 1:
                raise OpenAIError(400, "Ray mode serves one adapter per request; these prompts route to "
                                       f"{', '.join(sorted(map(public_name, adapters)))}. Send them separately.",
                                  param="prompt", code="mixed_adapters")
            forced = adapters.pop()
        name = public_name(forced)
        handle = self.generator.options(multiplexed_model_id=name, stream=req.stream)
        ignored = ignored_fields(kind, req)  # the replica's engine checks and refuses parameters (openai_params.py)
        extra = {IGNORED_HEADER: ",".join(ignored)} if ignored else {}
        if not req.stream:
            result = await handle.generate.remote(kind, raw)
            headers = {**_headers(name, result), **extra}
            if "error" in result:
                return JSONResponse(result["error"], status_code=result["status"], headers=headers)
            return JSONResponse(result["body"], headers=headers)
        events = handle.generate_stream.remote(kind, raw)
        meta = await events.__anext__()
        headers = {**_headers(name, meta), **extra}
        if "error" in meta:
            return JSONResponse(meta["error"], status_code=meta["status"], headers=headers)

        async def relay():
            try:
                async for chunk in events:
                    yield chunk
            finally:
                events.cancel()  # a client gone mid-stream cancels the replica's generator -> its row stops

        return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)


def _headers(adapter: str, meta: dict) -> dict:
    return {ADAPTER_HEADER: adapter, REPLICA_HEADER: meta["replica"], RESIDENT_HEADER: ",".join(meta["resident"]),
            WARM_HEADER: "1" if meta["warm"] else "0"}


def build_ray_app(bundle: str, *, replicas: int = 2, adapters_per_replica: int = 4, max_batch_size: int = 16,
                  max_wait_ms: float = 10.0, default_max_tokens: int = 256, num_cpus: float = 1.0):
    """The Serve application (ingress + generator), ready for `serve.run`."""
    from .app import create_app
    from .routing_only import load_routing_only

    generator = generator_deployment(bundle, replicas=replicas, adapters_per_replica=adapters_per_replica,
                                     max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                     default_max_tokens=default_max_tokens, num_cpus=num_cpus)

    @serve.deployment(name="AriadneIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                      **DEPLOYMENT_HEALTH_CHECK)
    @serve.ingress()
    class Ingress:
        def __init__(self, generator_handle):
            self.backend = RayBackend(load_routing_only(bundle), generator_handle)

        def __serve_build_asgi_app__(self):
            return create_app(self.backend, title="ariadne serve (ray)")

    return Ingress.bind(generator.bind())


def start_ray(bundle: str, *, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None, **options):
    """Start (or join) a local Ray instance and Serve on host:port, and deploy the bundle. Returns the base URL.

    A Ray instance started here listens on 127.0.0.1 only (ray_environment.py; Serve's HTTP proxy on `host`); when
    Ray was imported before ariadne_hf.serving.ray_app and chose the network address, a warning says how to fix it.
    """
    import ray

    if not ray.is_initialized():
        prepare_local_ray_environment()
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
        node = ray.util.get_node_ip_address()
        if node not in LOOPBACK_HOSTS and not os.environ.get("RAY_ADDRESS"):
            warnings.warn(f"the local Ray instance listens on {node}, not on loopback: Ray was imported before "
                          "ariadne_hf.serving.ray_app. Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment "
                          "(or import ariadne_hf.serving.ray_app first) to keep it on 127.0.0.1.", stacklevel=2)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_ray_app(bundle, **options), name="ariadne", route_prefix="/")
    return f"http://{host}:{port}"


def run_forever(bundle: str, *, host: str, port: int, **options) -> None:
    """`ariadne serve BUNDLE --ray`: deploy and block until interrupted, then shut Serve and Ray down."""
    import ray

    url = start_ray(bundle, host=host, port=port, **options)
    print(f"ariadne serve --ray: OpenAI API on {url}/v1 (Ctrl-C to stop)", flush=True)
    try:
        while True:
            asyncio.run(asyncio.sleep(3600))
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]



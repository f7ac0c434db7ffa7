"""`ragrt serve --ray`: the same HTTP API as a Ray Serve application, over N engine replicas.

Two deployments. `EngineReplica` holds one Engine and its continuous batcher and runs the very
app `create_app` builds (routes, auth, limits, metrics, OpenAPI) on the ASGI messages it is
handed. `Ingress` takes each HTTP request, reads its body (413 beyond the limit) and forwards it
through a DeploymentHandle, whose default power-of-two-choices router sends it to the less loaded
of two replicas; the replica's response messages stream back unchanged, SSE included. The two
tiers exist so that a replica dying before its answer began costs a retry on another replica, not
an error (Serve's own proxy answers 500 for a dead replica's requests).

Imported only by `ragrt serve --ray` and by Serve config files (`import_path:
ragrt.serve.ray_app:build`); needs the `[ray]` extra.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass, fields

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ragrt.engine import Engine
from ragrt.errors import UserInputError
from ragrt.serve.app import create_app
from ragrt.serve.config import ServerConfig
from ragrt.serve.http_errors import error, error_body
from ragrt.serve.middleware import BodyLimit

log = logging.getLogger("ragrt.server")

APP_NAME = "ragrt"
ATTEMPTS = 3                   # replicas tried for a request whose replica died before answering
INGRESS_MAX_ONGOING = 1024     # the ingress only forwards; the replicas' queues decide what waits


@dataclass(eq=False)
class _Generation:
    """One opened bundle's app, and the requests it is still serving."""
    app: FastAPI
    requests: int = 0
    retired: bool = False

    def close_if_idle(self) -> None:
        if self.retired and self.requests == 0:
            self.app.state.services.batcher.close()


@serve.deployment
class EngineReplica:
    """One engine, opened from `user_config` (the ServerConfig fields). A new user_config (a new
    bundle) opens the new engine beside the old one, switches to it, and closes the old one once
    its last request has finished: the replica keeps answering throughout."""

    def __init__(self):
        self._current: _Generation | None = None

    async def reconfigure(self, settings: dict) -> None:
        config = server_config(settings)
        engine = await asyncio.to_thread(Engine.open, config.bundle, device=config.device, threads=config.threads,
                                         passage_kv_cache_mb=config.passage_kv_cache_mb)
        old, self._current = self._current, _Generation(create_app(config, engine))
        if old is not None:
            old.retired = True
            old.close_if_idle()

    async def http(self, method: str, path: str, query_string: bytes, headers: list, body: bytes):
        """Runs one request through the app; yields the ASGI messages it sends."""
        generation = self._current
        generation.requests += 1
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": query_string, "headers": headers, "client": None, "server": None}
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            # The client's departure reaches us as cancellation, not as a message.
            await asyncio.Event().wait()

        sent: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(generation.app(scope, receive, sent.put))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while (message := await sent.get()) is not None:
                yield message
            await task                 # what the app raised, if it failed
        finally:
            task.cancel()              # a caller that went away stops the decoding
            generation.requests -= 1
            generation.close_if_idle()

    def __del__(self):
        # Serve calls this once the replica's in-flight requests have finished.
        if self._current is not None:
            self._current.retired = True
            self._current.close_if_idle()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress()
class Ingress:
    """The HTTP entry: every request goes to an EngineReplica, and its answer comes back as is."""

    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int):
        self._replicas = replicas.options(stream=True)
        self._max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self):
        return BodyLimit(self._asgi, self._max_body_bytes)

    async def _asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:                    # BodyLimit stops this read past the limit, with 413
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        request = (scope["method"], scope["path"], scope["query_string"], list(scope["headers"]), body)
        refusal = error(503, "no engine replica could answer; retry later", "replica_unavailable",
                        {"Retry-After": "1"})
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if await self._answer(request, send, attempt):
                    return
            except BackPressureError:  # the router already holds max_queue requests for the replicas
                refusal = error(429, "the engine replicas' queues are full; retry later", "queue_full",
                                {"Retry-After": "1"})
                break
        await refusal(scope, receive, send)

    async def _answer(self, request: tuple, send, attempt: int) -> bool:
        """Streams one replica's answer to the client; False when the replica died before it began."""
        messages = self._replicas.http.remote(*request)
        started = False
        try:
            # The status goes out with the first body bytes, so a replica that dies in between
            # can still be replaced; a JSON answer is one body message, so it is all or nothing.
            start = await anext(messages)
            first = await anext(messages)
            started = True
            await send(start)
            await send(first)
            async for message in messages:
                await send(message)
            return True
        except RayActorError as e:
            log.warning("engine replica failed (attempt %d of %d): %s", attempt, ATTEMPTS, type(e).__name__)
            if not started:
                return False
            if not _is_event_stream(start):
                raise                  # the client sees a cut connection: no half JSON body passes as whole
            event = json.dumps(error_body("the engine replica serving this answer stopped; retry", "replica_failed"))
            await send({"type": "http.response.body", "body": f"event: error\ndata: {event}\n\n".encode(),
                        "more_body": False})
            return True
        finally:
            messages.cancel()


def _is_event_stream(start: dict) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"])


def server_config(settings: dict) -> ServerConfig:
    known = {f.name for f in fields(ServerConfig)}
    if unknown := sorted(set(settings) - known):
        raise UserInputError(f"unknown server settings {unknown}; known: {sorted(known)}")
    if "bundle" not in settings:
        raise UserInputError("the server settings need `bundle`, the bundle directory on every node")
    return ServerConfig(**settings)


def application(config: ServerConfig, *, replicas: int | None = None):
    """The Serve application: one Ingress in front of the EngineReplicas (`replicas` of them, or
    as many as a config file's num_replicas or autoscaling_config says). Each replica reserves
    `threads` CPUs (1 when threads is 0) and takes as many requests as its batch and queue hold;
    beyond that the router keeps up to max_queue waiting, then the ingress answers 429."""
    count = {} if replicas is None else {"num_replicas": replicas}
    engines = EngineReplica.options(
        **count, user_config=asdict(config), ray_actor_options={"num_cpus": config.threads or 1},
        max_ongoing_requests=config.max_batch + config.max_queue, max_queued_requests=max(config.max_queue, 1),
        graceful_shutdown_timeout_s=config.timeout_s)
    return Ingress.options(graceful_shutdown_timeout_s=config.timeout_s).bind(engines.bind(), config.max_body_bytes)


def build(args: dict):
    """The builder a Serve config file names (`import_path: ragrt.serve.ray_app:build`); `args`
    holds the ServerConfig fields, and the file's `deployments` section sets the replicas."""
    return application(server_config(args))


def run(config: ServerConfig, *, address: str | None, replicas: int) -> None:
    """Deploys on the Ray cluster at `address` (None: the local one, started if need be) and
    serves on config.host:config.port until Ctrl-C or SIGTERM; then the application is deleted,
    its replicas finishing their in-flight requests first (up to timeout_s)."""
    import signal
    import threading

    import ray

    from ragrt.bundle.reader import Bundle
    from ragrt.serve.config import read_api_key
    # Every node reads the same paths; this one too, so a wrong one fails here, in one line.
    Bundle.open(config.bundle)
    if config.api_key_file:
        read_api_key(config.api_key_file)

    def interrupt(*_):
        raise KeyboardInterrupt

    ray.init(address=address, logging_level=config.log_level.upper())
    signal.signal(signal.SIGTERM, interrupt)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(application(config, replicas=replicas), name=APP_NAME, route_prefix="/",
                  logging_config={"log_level": config.log_level.upper()})
        print(f"ragrt on Ray: http://{config.host}:{config.port}, {replicas} engine replicas; Ctrl-C stops",
              flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        ray.shutdown()

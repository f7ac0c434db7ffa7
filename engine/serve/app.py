"""`ragrt serve`: a thin HTTP shell over one Engine, on FastAPI and uvicorn.

Model work runs on threads (onnxruntime releases the GIL); concat answers from all
requests share one micro-batched decode loop (`batcher.py`). The bundle opens in the
background, so /healthz answers at once and /readyz turns 200 when the engine is open.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Iterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from ragrt import __version__
from ragrt.bundle.manifest import read_manifest
from ragrt.engine import Engine
from ragrt.serve.config import ServerConfig, read_api_key
from ragrt.serve.http_errors import add_error_handlers
from ragrt.serve.middleware import Auth, BodyLimit, Observe
from ragrt.serve.routes import api, probes
from ragrt.serve.services import Services
from ragrt.serve.web import PATH as WEB_PATH, web

CONFIG_ENV = "RAGRT_SERVE_CONFIG"      # how `--workers N` hands the config to each worker process
DESCRIPTION = ("Retrieval-augmented answers from one ragrt bundle. With an API key configured, "
               "every endpoint but /healthz (and the web page at /, which holds no data) needs "
               "`Authorization: Bearer KEY`.")


def create_app(config: ServerConfig, engine: Engine | None = None, *, announce: bool = False) -> FastAPI:
    """The ASGI app. With `engine`, it serves that open engine; otherwise it opens `config.bundle`.
    With `announce`, it prints one line on stdout once the bundle is open (`ragrt serve`)."""
    api_key = read_api_key(config.api_key_file) if config.api_key_file else None
    app = FastAPI(title="ragrt", version=__version__, description=DESCRIPTION, lifespan=_lifespan)
    services = Services(config, engine)
    app.state.services = services
    app.state.announce = announce
    add_error_handlers(app)
    routers = [probes, api, *([web] if config.web else [])]
    for router in routers:
        app.include_router(router)
    app.openapi = partial(_openapi, app, config, engine)
    # The last one added runs first: every request is observed, the refused ones too.
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(Auth, key=api_key, open=frozenset(["/healthz", *([WEB_PATH] if config.web else [])]))
    # An included router is one entry of app.routes, so its routes are read from the router itself.
    paths = {r.path for r in [*app.routes, *(r for router in routers for r in router.routes)] if isinstance(r, Route)}
    app.add_middleware(Observe, metrics=services.metrics, paths=paths)
    return app


def ready_line(config: ServerConfig, engine: Engine) -> str:
    """What `ragrt serve` prints once it answers: where, which bundle, and its passage KV."""
    kv = (f"unavailable ({engine.passage_kv_unavailable})" if engine.passage_kv is None else
          f"{engine.manifest.rag.passage_kv} by default, on or off per request")
    page = "the web page; the API under /v1" if config.web else "the API under /v1; no web page (--no-web)"
    return f"ragrt serve: ready on http://{config.host}:{config.port}/ ({page}), bundle {config.bundle}, passage KV {kv}"


def _announce(services: Services) -> None:
    if services.engine is not None:        # a bundle that failed to open was logged as an error
        print(ready_line(services.config, services.engine), flush=True)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    services: Services = app.state.services
    opening = None if services.engine else asyncio.create_task(run_in_threadpool(services.open))
    if opening is not None and app.state.announce:
        opening.add_done_callback(lambda _: _announce(services))
    yield
    # uvicorn has let in-flight requests finish; the batcher now drains what is left.
    if opening is not None:
        await opening
    if services.batcher is not None:
        await run_in_threadpool(services.batcher.close, services.config.timeout_s)


def _openapi(app: FastAPI, config: ServerConfig, engine: Engine | None) -> dict:
    """FastAPI's document, plus what this bundle allows: its answer length and its tasks."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        manifest = engine.manifest if engine else read_manifest(Path(config.bundle))
        limit = manifest.generator.max_context // 2
        models = schema["components"]["schemas"]
        models["AskRequest"]["properties"]["task"]["enum"] = ["qa", *sorted(manifest.prompt.tasks)]
        for model, fields in (("AskRequest", ["max_new_tokens"]),
                              ("ChatRequest", ["max_tokens", "max_completion_tokens"])):
            for name in fields:
                for option in models[model]["properties"][name]["anyOf"]:
                    if option.get("type") == "integer":
                        option["maximum"] = limit
    return app.openapi_schema


@contextmanager
def background(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serves `app` from a thread of the calling process until the block ends; yields the base URL.

    The socket is bound before uvicorn starts, so port 0 gives a free port no one else can take.
    """
    import uvicorn
    sock = socket.socket()
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def app_from_env() -> FastAPI:
    """The factory each `--workers` process calls; the parent passes the config in the environment."""
    return create_app(ServerConfig(**json.loads(os.environ[CONFIG_ENV])), announce=True)


def serve(config: ServerConfig) -> None:
    """Runs until SIGTERM or Ctrl-C; in-flight requests finish first (up to timeout_s)."""
    import uvicorn

    from ragrt.bundle.reader import Bundle
    Bundle.open(config.bundle)             # a wrong path fails here, in one line, before the port opens
    if config.api_key_file:
        read_api_key(config.api_key_file)
    options = dict(host=config.host, port=config.port, log_level=config.log_level,
                   timeout_graceful_shutdown=int(config.timeout_s))
    if config.workers > 1:
        os.environ[CONFIG_ENV] = json.dumps(asdict(config))
        uvicorn.run("ragrt.serve.app:app_from_env", factory=True, workers=config.workers, **options)
    else:
        uvicorn.run(create_app(config, announce=True), **options)

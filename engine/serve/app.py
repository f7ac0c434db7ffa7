"""`ragrt serve`: a thin HTTP shell over one Engine, on FastAPI and uvicorn.

Model work runs on threads (onnxruntime releases the GIL); greedy concat answers from all
requests share one micro-batched decode loop (`batcher.py`). The bundle opens in the
background, so /healthz answers at once and /readyz turns 200 when the engine is open.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException

from ragrt import __version__
from ragrt.serve.batcher import Batcher, Closed, DeadlineExceeded, QueueFull, batched_stream
from ragrt.engine import Answer, AnswerStream, Engine
from ragrt.errors import RagrtError, UserInputError
from ragrt.bundle.manifest import read_manifest
from ragrt.serve.metrics import Metrics
from ragrt.serve.schemas import (AskRequest, AskResponse, ChatRequest, ChatResponse, EmbedRequest, EmbedResponse,
                      ErrorResponse, RetrieveRequest, RetrieveResponse)

log = logging.getLogger("ragrt.server")
CONFIG_ENV = "RAGRT_SERVE_CONFIG"      # how `--workers N` hands the config to each worker process


@dataclass(frozen=True)
class ServerConfig:
    bundle: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    api_key_file: str | None = None
    max_batch: int = 8             # rows decoding together; 1 turns micro-batching off
    max_queue: int = 64            # requests waiting beyond the batch; more get 429
    timeout_s: float = 120.0       # every request's deadline; also the graceful-shutdown limit
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    device: str = "auto"
    threads: int = 0
    log_level: str = "warning"


class NotReady(RagrtError):
    """The bundle is still opening, or failed to open."""


STATUS = {UserInputError: (422, "invalid_request_error"), QueueFull: (429, "queue_full"),
          DeadlineExceeded: (503, "deadline_exceeded"), Closed: (503, "shutting_down"), NotReady: (503, "not_ready")}
ERRORS = {code: {"model": ErrorResponse, "description": kind}
          for code, kind in [(401, "missing or wrong API key"), (413, "request body too large"),
                             (422, "invalid request"), (429, "queue full"),
                             (503, "not ready, shutting down, or deadline passed")]}


def error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def read_api_key(path: str) -> str:
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--api-key-file {path}: cannot read it ({e})") from None
    if not key or any(c.isspace() for c in key):
        raise UserInputError(f"--api-key-file {path}: must hold one key without spaces")
    return key


class Services:
    """What the routes share: the engine once open, its batcher, and the metrics."""

    def __init__(self, config: ServerConfig, engine: Engine | None):
        self.config = config
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.failure: str | None = None
        if engine is not None:
            self._attach(engine)

    def _attach(self, engine: Engine) -> None:
        self.batcher = Batcher(engine.decoder, max_batch=self.config.max_batch, max_queue=self.config.max_queue)
        self.engine = engine

    def open(self) -> None:
        try:
            self._attach(Engine.open(self.config.bundle, device=self.config.device, threads=self.config.threads))
        except Exception as e:  # the server stays up to say why on /readyz
            self.failure = f"{type(e).__name__}: {e}" if not isinstance(e, RagrtError) else str(e)
            log.error("cannot open %s: %s", self.config.bundle, self.failure)

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise NotReady(f"the bundle failed to open: {self.failure}" if self.failure else "the bundle is still opening")
        return self.engine

    def start(self, question: str, **options) -> AnswerStream:
        """Checks, retrieves, and queues the decoding (raises QueueFull at once when the queue is full)."""
        engine = self.ready_engine()
        prepared = engine.prepare(question, **options)
        return batched_stream(engine, self.batcher, prepared, deadline_s=self.config.timeout_s)


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """The ASGI app. With `engine`, it serves that open engine; otherwise it opens `config.bundle`."""
    services = Services(config, engine)
    api_key = read_api_key(config.api_key_file) if config.api_key_file else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        opening = None if services.engine else asyncio.create_task(run_in_threadpool(services.open))
        yield
        # uvicorn has let in-flight requests finish; the batcher now drains what is left.
        if opening is not None:
            await opening
        if services.batcher is not None:
            await run_in_threadpool(services.batcher.close, config.timeout_s)

    app = FastAPI(title="ragrt", version=__version__, lifespan=lifespan,
                  description="Retrieval-augmented answers from one ragrt bundle. With an API key configured, "
                              "every endpoint but /healthz needs `Authorization: Bearer KEY`.")
    app.state.services = services

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]]
        return error(422, "; ".join(parts) or "invalid request", "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        if exc.status_code == 400:     # FastAPI's answer to a body that is not UTF-8 JSON
            return error(422, f"the request body is not valid JSON ({exc.detail})", "invalid_request_error")
        return error(exc.status_code, str(exc.detail), "http_error", getattr(exc, "headers", None))

    @app.exception_handler(RagrtError)
    async def ragrt_error(_: Request, exc: RagrtError):
        status, kind = next((v for t, v in STATUS.items() if isinstance(exc, t)), (500, "internal_error"))
        return error(status, str(exc), kind, {"Retry-After": "1"} if status in (429, 503) else None)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unexpected error")
        return error(500, f"internal error: {type(exc).__name__}", "internal_error")

    def ready() -> Engine:
        return services.ready_engine()

    @app.get("/healthz", summary="the process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="200 once the bundle is open", responses=ERRORS)
    async def readyz():
        engine = services.ready_engine()
        return {"status": "ready", "bundle": str(engine.bundle.root)}

    @app.get("/metrics", summary="Prometheus text", response_class=PlainTextResponse, responses=ERRORS)
    async def metrics():
        stats = services.batcher.stats() if services.batcher else None
        return PlainTextResponse(services.metrics.render(stats), media_type="text/plain; version=0.0.4")

    @app.post("/v1/ask", response_model=AskResponse, responses={
        **ERRORS, 200: {"content": {"text/event-stream": {}},
                        "description": "JSON, or with stream: `token` events {text} then one `answer` event"}})
    async def ask(req: AskRequest, _: Engine = Depends(ready)):
        options = dict(k=req.k, mode=req.mode, max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                       history=[t.model_dump() for t in req.history], task=req.task)
        stream = await run_in_threadpool(lambda: services.start(req.question, **options))
        if req.stream:
            return _sse(stream, lambda piece: ("token", {"text": piece}),
                        lambda answer: [("answer", answer.to_dict())], services.metrics)
        return (await _drain(stream, services.metrics)).to_dict()

    @app.post("/v1/chat/completions", response_model=ChatResponse, responses={
        **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "a completion, or chunks with stream"}})
    async def chat(req: ChatRequest, engine: Engine = Depends(ready)):
        question, history = _conversation(req)
        limit = req.max_completion_tokens or req.max_tokens or engine.manifest.rag.max_new_tokens
        stream = await run_in_threadpool(lambda: services.start(question, max_new_tokens=limit, history=history))
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def finish(answer: Answer) -> str:
            return "length" if answer.new_tokens >= limit else "stop"

        if req.stream:
            def chunk(delta: dict, reason: str | None = None, **extra) -> dict:
                return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra}

            def last(answer: Answer) -> list:
                return [(None, chunk({}, finish(answer), sources=[vars(s) for s in answer.sources])), (None, "[DONE]")]

            return _sse(stream, lambda piece: (None, chunk({"content": piece})), last, services.metrics,
                        first=(None, chunk({"role": "assistant", "content": ""})))
        answer = await _drain(stream, services.metrics)
        return {"id": ident, "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer},
                             "finish_reason": finish(answer)}],
                "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.new_tokens,
                          "total_tokens": answer.prompt_tokens + answer.new_tokens},
                "sources": [vars(s) for s in answer.sources]}

    @app.get("/v1/models", summary="OpenAI clients list models; this server has one", responses=ERRORS)
    async def models(engine: Engine = Depends(ready)):
        return {"object": "list", "data": [{"id": engine.manifest.generator.source.name, "object": "model",
                                            "created": 0, "owned_by": "ragrt"}]}

    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=ERRORS)
    async def retrieve(req: RetrieveRequest, engine: Engine = Depends(ready)):
        t0 = time.perf_counter()
        hits = await run_in_threadpool(engine.retrieve, req.query, req.k)
        return {"passages": [{"id": h.id, "title": h.title, "text": h.text, "score": h.score} for h in hits],
                "timings_ms": {"total": round((time.perf_counter() - t0) * 1e3, 2)}}

    @app.post("/v1/embed", response_model=EmbedResponse, responses=ERRORS)
    async def embed(req: EmbedRequest, engine: Engine = Depends(ready)):
        vectors = await run_in_threadpool(engine.embed, req.texts)
        return {"embeddings": vectors.tolist(), "dim": int(vectors.shape[1])}

    def openapi() -> dict:
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

    app.openapi = openapi
    # The last one added runs first: every request is observed, the refused ones too.
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_Auth, key=api_key)
    app.add_middleware(_Observe, metrics=services.metrics, paths={r.path for r in app.routes})
    return app


def _conversation(req: ChatRequest) -> tuple[str, list[dict]]:
    """The last message is the question; earlier user and assistant turns are the history.
    System messages are dropped: the bundle's task prompt is the system prompt."""
    def text(content) -> str:
        return content if isinstance(content, str) else "".join(p.text for p in content or [])

    *earlier, last = req.messages
    if last.role != "user":
        raise UserInputError(f"the last message must be the user's question, got role {last.role!r}")
    history = [{"role": m.role, "content": text(m.content)} for m in earlier if m.role in ("user", "assistant")]
    return text(last.content), history


async def _drain(stream: AnswerStream, metrics: Metrics) -> Answer:
    try:
        await run_in_threadpool(lambda: [None for _ in stream])
    finally:
        stream.close()
    metrics.answered(stream.answer.new_tokens)
    return stream.answer


def _sse(stream: AnswerStream, on_piece: Callable, on_answer: Callable, metrics: Metrics,
         first: tuple | None = None) -> StreamingResponse:
    """Server-sent events. An error after the first byte can no longer change the status, so it
    becomes an `error` event."""
    def frame(event: str | None, data) -> str:
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            if first:
                yield frame(*first)
            async for piece in iterate_in_threadpool(iter(stream)):
                yield frame(*on_piece(piece))
            metrics.answered(stream.answer.new_tokens)
            for event in on_answer(stream.answer):
                yield frame(*event)
        except RagrtError as e:
            status, kind = next((v for t, v in STATUS.items() if isinstance(e, t)), (500, "internal_error"))
            yield frame("error", {"error": {"message": str(e), "type": kind}})
        finally:
            stream.close()             # a client that left stops the decoding

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _BodyLimit:
    """Refuses request bodies over `limit` bytes with 413, by Content-Length when sent and by
    counting otherwise, so an oversized upload is never held in memory whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, receive, send)
        seen, over = 0, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _TooLarge
            return message

        async def guarded(message):
            # The framework turns a failed body read into its own error response; ours replaces it.
            if not over:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._refuse(scope, receive, send)

        try:
            await self.app(scope, counted, guarded)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = error(413, f"the request body is over {self.limit} bytes", "request_too_large")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class _Auth:
    """Bearer-key check in front of every route but /healthz (pure ASGI: streams pass untouched)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or scope["path"] == "/healthz":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(header, b"Bearer " + self.key.encode()):
            return await self.app(scope, receive, send)
        response = error(401, "missing or wrong API key: send Authorization: Bearer KEY", "unauthorized",
                         {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class _Observe:
    """Counts every request and times it to its last byte; unknown paths share one label."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - t0)


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
    return create_app(ServerConfig(**json.loads(os.environ[CONFIG_ENV])))


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
        uvicorn.run(create_app(config), **options)

"""The endpoints: probes and metrics, then the /v1 API (ragrt's own and OpenAI's chat completions).
Each reaches the app's Services through `request.app.state`, so one process can hold several apps."""
from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from ragrt.engine import Answer, Engine
from ragrt.errors import UserInputError
from ragrt.options import MAX_K, MODES, PASSAGE_KV_MODES
from ragrt.serve.http_errors import ERRORS
from ragrt.serve.schemas import (AskRequest, AskResponse, ChatRequest, ChatResponse, EmbedRequest, EmbedResponse,
                                 RetrieveRequest, RetrieveResponse)
from ragrt.serve.services import Services
from ragrt.serve.streaming import drain, sse


def _services(request: Request) -> Services:
    return request.app.state.services


def _ready(services: Annotated[Services, Depends(_services)]) -> Engine:
    return services.ready_engine()


Shared = Annotated[Services, Depends(_services)]
Ready = Annotated[Engine, Depends(_ready)]          # raises NotReady (503) until the bundle is open

probes = APIRouter()
api = APIRouter(prefix="/v1", responses=ERRORS)


@probes.get("/healthz", summary="the process is up")
async def healthz():
    return {"status": "ok"}


@probes.get("/readyz", summary="200 once the bundle is open", responses=ERRORS)
async def readyz(engine: Ready):
    return {"status": "ready", "bundle": str(engine.bundle.root)}


@probes.get("/metrics", summary="Prometheus text", response_class=PlainTextResponse, responses=ERRORS)
async def metrics(request: Request, services: Shared):
    body, content_type = services.metrics.expose(request.headers.get("accept"))
    return Response(body, media_type=content_type)


@api.post("/ask", response_model=AskResponse, responses={
    200: {"content": {"text/event-stream": {}},
          "description": "JSON, or with stream: `token` events {text} then one `answer` event"}})
async def ask(req: AskRequest, services: Shared, _: Ready):
    options = dict(k=req.k, retrieval=req.retrieval, mode=req.mode, max_new_tokens=req.max_new_tokens, prior_temperature=req.prior_temperature,
                   **req.decoding_options(),
                   history=[t.model_dump() for t in req.history], task=req.task, passage_kv=req.passage_kv)
    stream = await run_in_threadpool(lambda: services.start(req.question, **options))
    if req.stream:
        return sse(stream, lambda piece: ("token", {"text": piece}),
                   lambda answer: [("answer", answer.to_dict())], services.metrics)
    return (await drain(stream, services.metrics)).to_dict()


@api.post("/chat/completions", response_model=ChatResponse, responses={
    200: {"content": {"text/event-stream": {}}, "description": "a completion, or chunks with stream"}})
async def chat(req: ChatRequest, services: Shared, engine: Ready):
    question, history = _conversation(req)
    limit = req.max_completion_tokens or req.max_tokens or engine.manifest.rag.max_new_tokens
    stream = await run_in_threadpool(lambda: services.start(question, max_new_tokens=limit, history=history,
                                                            passage_kv=req.passage_kv, mode=req.mode, retrieval=req.retrieval,
                                                            **req.decoding_options()))
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def finish(answer: Answer) -> str:
        return answer.finish_reason

    if req.stream:
        def chunk(delta: dict, reason: str | None = None, **extra) -> dict:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra}

        def last(answer: Answer) -> list:
            return [(None, chunk({}, finish(answer), sources=[s.to_dict() for s in answer.sources],
                                 grounded=answer.grounded, passage_kv=answer.passage_kv)), (None, "[DONE]")]

        return sse(stream, lambda piece: (None, chunk({"content": piece})), last, services.metrics,
                   first=(None, chunk({"role": "assistant", "content": ""})))
    answer = await drain(stream, services.metrics)
    return {"id": ident, "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer},
                         "finish_reason": finish(answer)}],
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.new_tokens,
                      "total_tokens": answer.prompt_tokens + answer.new_tokens},
            "sources": [s.to_dict() for s in answer.sources], "grounded": answer.grounded,
            "passage_kv": answer.passage_kv}


@api.get("/options", summary="the choices /v1/ask accepts, and this bundle's defaults (the web page's controls)")
async def options(engine: Ready):
    rag = engine.manifest.rag
    return {"modes": list(MODES), "passage_kv_modes": list(PASSAGE_KV_MODES), "max_k": MAX_K,
            "tasks": ["qa", *sorted(engine.manifest.prompt.tasks)],
            "defaults": {"k": rag.k, "mode": rag.mode, "passage_kv": "auto", "max_new_tokens": rag.max_new_tokens},
            "passage_kv": {"bundle_default": rag.passage_kv, "unavailable": engine.passage_kv_unavailable},
            "bundle": engine.bundle.root.name}


@api.get("/models", summary="OpenAI clients list models; this server has one")
async def models(engine: Ready):
    return {"object": "list", "data": [{"id": engine.manifest.generator.source.name, "object": "model",
                                        "created": 0, "owned_by": "ragrt"}]}


@api.post("/retrieve", response_model=RetrieveResponse)
async def retrieve(req: RetrieveRequest, engine: Ready):
    t0 = time.perf_counter()
    hits = await run_in_threadpool(engine.retrieve, req.query, req.k, req.retrieval)
    return {"passages": [{"id": h.id, "title": h.title, "text": h.text, "score": h.score} for h in hits],
            "timings_ms": {"total": round((time.perf_counter() - t0) * 1e3, 2)}}


@api.post("/embed", response_model=EmbedResponse)
async def embed(req: EmbedRequest, engine: Ready):
    vectors = await run_in_threadpool(engine.embed, req.texts)
    return {"embeddings": vectors.tolist(), "dim": int(vectors.shape[1])}


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

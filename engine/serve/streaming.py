"""How an answer reaches the client: drained into one JSON body, or sent as server-sent events."""
from __future__ import annotations

import json
from typing import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from ragrt.engine import Answer, AnswerStream
from ragrt.errors import RagrtError
from ragrt.serve.http_errors import error_body, http_status
from ragrt.serve.metrics import Metrics


async def drain(stream: AnswerStream, metrics: Metrics) -> Answer:
    try:
        await run_in_threadpool(lambda: [None for _ in stream])
    finally:
        stream.close()
    metrics.answered(stream.answer.new_tokens)
    return stream.answer


def sse(stream: AnswerStream, on_piece: Callable, on_answer: Callable, metrics: Metrics,
        first: tuple | None = None) -> StreamingResponse:
    """Server-sent events: `first`, then `on_piece(text)` for each piece, then the events of
    `on_answer(answer)`, each an (event name or None, data) pair. An error after the first byte
    can no longer change the status, so it becomes an `error` event."""
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
            _, kind = http_status(e)
            yield frame("error", error_body(str(e), kind))
        finally:
            stream.close()             # a client that left stops the decoding

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

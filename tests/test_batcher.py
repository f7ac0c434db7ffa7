"""The micro-batcher: answers decoded in a shared, changing batch equal answers decoded alone."""
import threading
import time

import pytest

from ragrt import Engine
from ragrt.decoding.sampling import DecodingConfig
from ragrt.serve.batcher import Batcher, DeadlineExceeded, QueueFull
from ragrt.serve.services import batched_stream
from bundle_variants import UNNUMBERED, bundle_variant
from serving import GatedDecoder

QUESTIONS = ["How do I copy a list?", "What is the GIL?", "How are JSON documents parsed?",
             "What does open() return?", "What do generators yield?", "Is a list mutable?"]


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.open(tiny_bundle, threads=1)


@pytest.mark.parametrize("row_by_row", [False, True], ids=["batched", "row-by-row"])
def test_concurrent_answers_equal_answers_alone(engine, row_by_row, monkeypatch):
    monkeypatch.setattr(engine.decoder, "row_by_row", row_by_row)
    # Different limits make rows leave at different steps while others join.
    limits = [3, 17, 9, 24, 5, 12]
    alone = [engine.ask(q, max_new_tokens=n).answer for q, n in zip(QUESTIONS, limits)]
    batcher = Batcher(engine.decoder, max_batch=4, max_queue=16)
    got = [None] * len(QUESTIONS)

    def client(i):
        time.sleep(0.01 * i)
        stream = batched_stream(engine, batcher, engine.prepare(QUESTIONS[i], max_new_tokens=limits[i]), deadline_s=60)
        for _ in stream:
            pass
        got[i] = stream.answer.answer

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert got == alone
    assert batcher.stats().tokens > 0


def test_full_queue_and_deadline(engine):
    gated = GatedDecoder(engine.decoder)
    batcher = Batcher(gated, max_batch=1, max_queue=1)
    prompt = engine.prepare("What is the GIL?").builder.build("What is the GIL?", []).ids
    running = batcher.submit(prompt, DecodingConfig(max_new_tokens=3), deadline_s=60)
    while batcher.stats().waiting:                  # the worker took it and waits at the gate
        time.sleep(0.01)
    expired = batcher.submit(prompt, DecodingConfig(max_new_tokens=3), deadline_s=0.0)
    with pytest.raises(QueueFull, match="already waiting"):
        batcher.submit(prompt, DecodingConfig(max_new_tokens=3), deadline_s=60)
    gated.gate.set()
    assert len(list(running)) <= 3
    with pytest.raises(DeadlineExceeded, match="waited in the queue"):
        list(expired)
    batcher.close(timeout=30)
    assert batcher.stats().active == 0


def test_engine_is_safe_to_share_across_threads(engine):
    alone = [engine.ask(q, max_new_tokens=10).answer for q in QUESTIONS]
    got = [None] * len(QUESTIONS)

    def client(i):
        got[i] = engine.ask(QUESTIONS[i], max_new_tokens=10).answer

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


@pytest.fixture(scope="module")
def kv_engine(tiny_bundle, tmp_path_factory):
    return Engine.open(bundle_variant(tiny_bundle, tmp_path_factory.mktemp("kv") / "bundle", UNNUMBERED), threads=1)


def test_block_and_plain_rows_share_a_batch(kv_engine):
    """Answers with passage KV on and off, prefilled together and decoded in one batch, equal the
    engine's own; each request counts its own blocks."""
    k, choices, limits = 3, ["off", "on", "off", "on", "on", "off"], [6, 17, 9, 24, 5, 12]
    requests = [dict(k=k, max_new_tokens=n, passage_kv=c) for n, c in zip(limits, choices)]
    alone = [kv_engine.ask(q, **r) for q, r in zip(QUESTIONS, requests)]
    assert alone[1].passage_kv["computed"] > 0
    gated = GatedDecoder(kv_engine.decoder)
    batcher = Batcher(gated, passage_kv=kv_engine.passage_kv, max_batch=8, prefill_tokens=1 << 20)
    prepared = [kv_engine.prepare(q, **r) for q, r in zip(QUESTIONS, requests)]
    streams = [batched_stream(kv_engine, batcher, prepared[0], deadline_s=60)]
    while batcher.stats().waiting:                  # the worker holds the first (plain) prompt at the gate
        time.sleep(0.01)
    # The rest wait, and then are prefilled in one call: block and plain prompts together.
    streams += [batched_stream(kv_engine, batcher, p, deadline_s=60) for p in prepared[1:]]
    gated.gate.set()
    for s in streams:
        for _ in s:
            pass
    batcher.close()
    assert [s.answer.answer for s in streams] == [a.answer for a in alone]
    # The answers alone left every block in the cache.
    assert [s.answer.passage_kv for s in streams] == [None if c == "off" else {"reused": k, "computed": 0}
                                                      for c in choices]
    assert all("kv_assemble" in s.answer.timings_ms for s, c in zip(streams, choices) if c == "on")

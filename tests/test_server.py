"""The real server on a loopback port, spoken to over HTTP: answers equal the engine's,
bad requests get 422 with a message, keys, a full queue and deadlines get their own codes."""
import json
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ragrt import Engine
from ragrt.serve.app import ServerConfig, create_app
from serving import GatedDecoder, running_server

QUESTION = "How do I copy a list?"


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.open(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def base(tiny_bundle):
    """The server opens the bundle itself, as `ragrt serve` does."""
    with running_server(create_app(ServerConfig(bundle=str(tiny_bundle), threads=1))) as url:
        yield url


def post(base, path, body, **kw):
    return httpx.post(f"{base}{path}", json=body, timeout=60, **kw)


def sse_events(text):
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields.get("event"), fields["data"]))
    return events


def test_health_ready_and_openapi(base):
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").json()["status"] == "ready"
    spec = httpx.get(f"{base}/openapi.json").json()
    assert {"/v1/ask", "/v1/chat/completions", "/v1/retrieve", "/v1/embed", "/metrics"} <= set(spec["paths"])


def test_ask_equals_the_engine(base, engine):
    r = post(base, "/v1/ask", {"question": QUESTION, "k": 3, "max_new_tokens": 12})
    assert r.status_code == 200
    body = r.json()
    ref = engine.ask(QUESTION, k=3, max_new_tokens=12)
    assert body["answer"] == ref.answer
    assert [s["id"] for s in body["sources"]] == [s.id for s in ref.sources]
    assert set(body["timings_ms"]) == {"embed", "retrieve", "prefill", "decode", "total"}
    assert body["grounded"] == ref.grounded
    assert [s["quotes"] for s in body["sources"]] == [[q.to_dict() for q in s.quotes] for s in ref.sources]


def test_mode_extract_on_every_surface(base, engine):
    """/v1/ask, its stream and the OpenAI endpoint answer with the passage's own sentence, quoted."""
    ref = engine.ask(QUESTION, mode="extract")
    assert ref.answer == "Use list.copy() or a slice a[:] to copy a list. Lists are mutable sequences."
    assert ref.grounded == 1.0
    body = post(base, "/v1/ask", {"question": QUESTION, "mode": "extract"}).json()
    assert body["answer"] == ref.answer and body["mode"] == "extract" and body["prompt_tokens"] == 0
    [quote] = body["sources"][0]["quotes"]
    assert body["answer"][slice(*quote["answer"])] == body["sources"][0]["text"][slice(*quote["passage"])]
    events = sse_events(post(base, "/v1/ask", {"question": QUESTION, "mode": "extract", "stream": True}).text)
    assert "".join(json.loads(d)["text"] for e, d in events if e == "token").strip() == ref.answer
    refused = post(base, "/v1/ask", {"question": QUESTION, "mode": "extract", "temperature": 0.8})
    assert refused.status_code == 422 and "cannot sample" in refused.json()["error"]["message"]
    chat = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}],
                                               "mode": "extract"}).json()
    assert chat["choices"][0]["message"]["content"] == ref.answer and chat["grounded"] == 1.0
    assert chat["sources"][0]["quotes"] == body["sources"][0]["quotes"]


@pytest.mark.parametrize("mode", ["concat", "token"])
def test_stream_is_server_sent_events(base, engine, mode):
    r = post(base, "/v1/ask", {"question": QUESTION, "max_new_tokens": 10, "stream": True, "mode": mode})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [e for e, _ in events[:-1]] == ["token"] * (len(events) - 1) and events[-1][0] == "answer"
    pieces = "".join(json.loads(d)["text"] for _, d in events[:-1])
    answer = json.loads(events[-1][1])
    assert pieces.strip() == answer["answer"] == engine.ask(QUESTION, max_new_tokens=10, mode=mode).answer


def test_history_and_the_summarize_task(base):
    plain = post(base, "/v1/ask", {"question": QUESTION, "max_new_tokens": 4}).json()
    history = [{"role": "user", "content": "Tell me about tuples."}, {"role": "assistant", "content": "Immutable."}]
    followed = post(base, "/v1/ask", {"question": QUESTION, "max_new_tokens": 4, "history": history}).json()
    assert followed["prompt_tokens"] > plain["prompt_tokens"]
    summary = post(base, "/v1/ask", {"question": "lists", "task": "summarize", "max_new_tokens": 4})
    assert summary.status_code == 200 and summary.json()["new_tokens"] > 0


def test_retrieve_and_embed(base, engine):
    passages = post(base, "/v1/retrieve", {"query": "json parsing", "k": 2}).json()["passages"]
    assert [p["id"] for p in passages] == [h.id for h in engine.retrieve("json parsing", k=2)]
    body = post(base, "/v1/embed", {"texts": ["a list", "the GIL"]}).json()
    got = np.array(body["embeddings"], dtype=np.float32)
    assert body["dim"] == got.shape[1]
    np.testing.assert_allclose(got, engine.embed(["a list", "the GIL"]), atol=1e-6)


BAD = [
    ("/v1/ask", '{"question": '),                                          # malformed JSON
    ("/v1/ask", "[]"),
    ("/v1/ask", '{"question": 5}'),
    ("/v1/ask", '{"question": "q", "k": "3"}'),
    ("/v1/ask", '{"question": "q", "k": true}'),
    ("/v1/ask", '{"question": "q", "k": 0}'),
    ("/v1/ask", '{"question": "q", "stream": "yes"}'),
    ("/v1/ask", '{"question": "q", "mode": "fast"}'),
    ("/v1/ask", '{"question": "q", "colour": "blue"}'),
    ("/v1/ask", '{"question": "   "}'),
    ("/v1/ask", '{"question": "q", "max_new_tokens": 100000}'),
    ("/v1/ask", '{"question": "q", "prior_temperature": 0}'),
    ("/v1/ask", '{"question": "q", "task": "translate"}'),
    ("/v1/ask", '{"question": "q", "history": [{"role": "robot", "content": "x"}]}'),
    ("/v1/chat/completions", '{"messages": []}'),
    ("/v1/chat/completions", '{"messages": [{"role": "assistant", "content": "hi"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": 7}]}'),
    ("/v1/retrieve", '{"query": "q", "k": 51}'),
    ("/v1/embed", '{"texts": []}'),
    ("/v1/embed", '{"texts": "one"}'),
]


@pytest.mark.parametrize("path,body", BAD)
def test_bad_requests_are_422_with_a_message(base, path, body):
    r = httpx.post(f"{base}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"]


def test_unknown_path_is_a_json_404(base):
    r = httpx.get(f"{base}/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_an_oversized_body_is_413(base):
    big = {"question": "x" * (2 << 20)}
    r = post(base, "/v1/ask", big)
    assert r.status_code == 413 and "over" in r.json()["error"]["message"]

    def chunks():                  # no Content-Length: the server counts as it reads
        for _ in range(40):
            yield b" " * 65536
    r = httpx.post(f"{base}/v1/ask", content=chunks(), timeout=60)
    assert r.status_code == 413
    assert post(base, "/v1/ask", {"question": "How do I copy a list?", "max_new_tokens": 2}).status_code == 200


def scrape(url) -> dict:
    """/metrics as {(sample name, sorted labels): value}, read by Prometheus' own parser."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_tokens_and_queue(base):
    post(base, "/v1/ask", {"question": QUESTION, "max_new_tokens": 3})
    samples = scrape(base)
    assert samples[("ragrt_requests_total", (("method", "POST"), ("path", "/v1/ask"), ("status", "200")))] >= 1
    assert samples[("ragrt_request_seconds_bucket", (("le", "+Inf"), ("path", "/v1/ask")))] >= 1
    for name in ("ragrt_tokens_per_second", "ragrt_queue_depth", "ragrt_batch_size", "ragrt_generated_tokens_total",
                 "ragrt_decoder_steps_total"):
        assert (name, ()) in samples
    assert samples[("ragrt_generated_tokens_total", ())] > 0
    assert samples[("ragrt_decoder_steps_total", ())] > 0
    assert samples[("ragrt_decoder_seconds_total", (("phase", "prefill"),))] > 0
    assert samples[("ragrt_decoder_seconds_total", (("phase", "step"),))] > 0


def test_each_app_keeps_its_own_metrics(base, tiny_bundle, engine):
    post(base, "/v1/ask", {"question": QUESTION, "max_new_tokens": 2})
    with running_server(create_app(ServerConfig(bundle=str(tiny_bundle)), engine)) as url:
        samples = scrape(url)
    assert not any(name == "ragrt_requests_total" and ("path", "/v1/ask") in labels for name, labels in samples)
    assert samples[("ragrt_requests_total", (("method", "GET"), ("path", "/readyz"), ("status", "200")))] >= 1


def test_api_key(tiny_bundle, engine, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    app = create_app(ServerConfig(bundle=str(tiny_bundle), api_key_file=str(key_file)), engine)
    good = {"Authorization": "Bearer s3cret"}
    with running_server(app, headers=good) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        for path in ("/readyz", "/metrics", "/openapi.json"):
            assert httpx.get(f"{url}{path}").status_code == 401
        r = post(url, "/v1/ask", {"question": QUESTION, "max_new_tokens": 2})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert post(url, "/v1/ask", {"question": QUESTION}, headers={"Authorization": "Bearer s3cre"}).status_code == 401
        assert post(url, "/v1/ask", {"question": QUESTION, "max_new_tokens": 2}, headers=good).status_code == 200


def test_a_full_queue_answers_429(tiny_bundle):
    engine = Engine.open(tiny_bundle, threads=1)
    engine.decoder = GatedDecoder(engine.decoder)
    app = create_app(ServerConfig(bundle=str(tiny_bundle), max_batch=1, max_queue=1), engine)
    batcher = app.state.services.batcher
    with running_server(app) as url:
        results = []

        def ask():
            results.append(post(url, "/v1/ask", {"question": QUESTION, "max_new_tokens": 3}).status_code)

        threads = [threading.Thread(target=ask) for _ in range(2)]
        threads[0].start()
        while batcher.stats().active < 1:              # the first holds the one batch slot, at the gate
            time.sleep(0.01)
        threads[1].start()
        while batcher.stats().waiting < 1:             # the second fills the queue
            time.sleep(0.01)
        r = post(url, "/v1/ask", {"question": QUESTION})
        assert r.status_code == 429 and r.json()["error"]["type"] == "queue_full"
        assert r.headers["retry-after"] == "1"
        engine.decoder.gate.set()
        for t in threads:
            t.join(60)
        assert results == [200, 200]


def test_a_passed_deadline_answers_503(tiny_bundle, engine):
    app = create_app(ServerConfig(bundle=str(tiny_bundle), timeout_s=1e-6), engine)
    with running_server(app) as url:
        r = post(url, "/v1/ask", {"question": QUESTION})
        assert r.status_code == 503 and r.json()["error"]["type"] == "deadline_exceeded"
        events = sse_events(post(url, "/v1/ask", {"question": QUESTION, "stream": True}).text)
        assert events[-1][0] == "error" and "deadline" in events[-1][1]
        assert json.loads(events[-1][1])["error"]["type"] == "deadline_exceeded"


def test_an_integral_float_is_an_integer(base):
    r = post(base, "/v1/retrieve", {"query": "json parsing", "k": 2.0})
    assert r.status_code == 200 and len(r.json()["passages"]) == 2
    assert post(base, "/v1/retrieve", {"query": "json parsing", "k": 2.5}).status_code == 422

"""Passage KV over HTTP: the request field, the block counts in every answer shape, and a clean
422 where the bundle has none."""
import json

import httpx
import pytest

from ragrt.serve.app import ServerConfig, create_app
from bundle_variants import NO_ROTARY, UNNUMBERED, bundle_variant
from serving import running_server

QUESTION = "What do generators yield?"


def post(base, path, body):
    return httpx.post(f"{base}{path}", json=body, timeout=60)


def answer_event(text):
    """The data of the last SSE event, checked to be the `answer` event."""
    event, data = text.strip().split("\n\n")[-1].splitlines()
    assert event == "event: answer"
    return json.loads(data.removeprefix("data: "))


@pytest.fixture(scope="module")
def base(tiny_bundle, tmp_path_factory):
    bundle = bundle_variant(tiny_bundle, tmp_path_factory.mktemp("kv") / "bundle", UNNUMBERED)
    with running_server(create_app(ServerConfig(bundle=str(bundle), threads=1, passage_kv_cache_mb=4))) as url:
        yield url


@pytest.fixture(scope="module")
def without(tiny_bundle, tmp_path_factory):
    """A server over a bundle whose manifest records no rotary positions."""
    bundle = bundle_variant(tiny_bundle, tmp_path_factory.mktemp("no-kv") / "bundle", NO_ROTARY)
    with running_server(create_app(ServerConfig(bundle=str(bundle), threads=1))) as url:
        yield url


def test_the_same_question_twice_reuses_its_blocks(base):
    body = {"question": QUESTION, "k": 3, "max_new_tokens": 6, "passage_kv": "on"}
    first, second = post(base, "/v1/ask", body).json(), post(base, "/v1/ask", body).json()
    assert first["passage_kv"] == {"reused": 0, "computed": 3}
    assert second["passage_kv"] == {"reused": 3, "computed": 0}
    assert second["answer"] == first["answer"] and "kv_assemble" in second["timings_ms"]
    streamed = answer_event(post(base, "/v1/ask", {**body, "stream": True}).text)
    assert streamed["passage_kv"] == {"reused": 3, "computed": 0} and streamed["answer"] == first["answer"]
    off = post(base, "/v1/ask", {**body, "passage_kv": "off"}).json()
    assert off["passage_kv"] is None and "kv_assemble" not in off["timings_ms"]


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_modes_beside_the_batch_count_blocks(base, mode):
    r = post(base, "/v1/ask", {"question": QUESTION, "k": 2, "max_new_tokens": 4, "mode": mode, "passage_kv": "on"})
    assert sum(r.json()["passage_kv"].values()) == 2


def test_chat_completions_take_passage_kv(base):
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "passage_kv": "on"}
    done = post(base, "/v1/chat/completions", body).json()
    assert sum(done["passage_kv"].values()) == 5       # the bundle's k
    chunks = [json.loads(line.removeprefix("data: "))
              for line in post(base, "/v1/chat/completions", {**body, "stream": True}).text.splitlines()
              if line.startswith("data: {")]
    assert chunks[-1]["passage_kv"] == {"reused": 5, "computed": 0}


@pytest.mark.parametrize("path,body", [
    ("/v1/ask", {"question": QUESTION, "passage_kv": "yes"}),
    ("/v1/ask", {"question": QUESTION, "passage_kv": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "passage_kv": "always"}),
])
def test_a_bad_choice_is_422(base, path, body):
    r = post(base, path, body)
    assert r.status_code == 422 and "passage_kv" in r.json()["error"]["message"]


def test_on_without_passage_kv_is_422(without):
    r = post(without, "/v1/ask", {"question": QUESTION, "max_new_tokens": 2, "passage_kv": "on"})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {"type": "invalid_request_error", "message": "passage KV is not available for this "
                                 "bundle: its manifest does not record the generator's rotary positions (re-export "
                                 "the bundle)"}
    chat = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2, "passage_kv": "on"}
    assert post(without, "/v1/chat/completions", chat).status_code == 422
    auto = post(without, "/v1/ask", {"question": QUESTION, "max_new_tokens": 2})
    assert auto.status_code == 200 and auto.json()["passage_kv"] is None

"""`ragrt serve --ray`: the Serve application answers like the plain server (the openai client
included), loses no request when a replica dies under load, and takes the soak mix without a 5xx."""
import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import subprocess
import sys

import httpx
import pytest

from ragrt import Engine
from ragrt.serve.config import ServerConfig
from serving import wait_ready
from test_soak import INVALID, VALID, free_port

AUTH = {"Authorization": "Bearer k-123"}
QUESTION = "How do I copy a list?"


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.open(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def ray():
    return pytest.importorskip("ray", reason="the ray extra is not installed")


@pytest.fixture(scope="module")
def base(ray, tiny_bundle, tmp_path_factory):
    from ray import serve

    from ragrt.serve.ray_app import APP_NAME, application
    key = tmp_path_factory.mktemp("key") / "key"
    key.write_text("k-123")
    config = ServerConfig(bundle=str(tiny_bundle), threads=1, api_key_file=str(key), timeout_s=60)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(config, replicas=2), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, headers=AUTH)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def post(base, path, body, **kw):
    return httpx.post(f"{base}{path}", json=body, headers=AUTH, timeout=60, **kw)


@pytest.mark.ray
def test_ask_stream_and_the_http_contract(base, engine):
    r = post(base, "/v1/ask", {"question": QUESTION, "k": 3, "max_new_tokens": 12})
    assert r.status_code == 200, r.text
    ref = engine.ask(QUESTION, k=3, max_new_tokens=12)
    assert r.json()["answer"] == ref.answer
    assert [s["id"] for s in r.json()["sources"]] == [s.id for s in ref.sources]

    r = post(base, "/v1/ask", {"question": QUESTION, "max_new_tokens": 10, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [dict(line.split(": ", 1) for line in block.splitlines()) for block in r.text.strip().split("\n\n")]
    assert [e.get("event") for e in events[:-1]] == ["token"] * (len(events) - 1) and events[-1]["event"] == "answer"
    assert json.loads(events[-1]["data"])["answer"] == engine.ask(QUESTION, max_new_tokens=10).answer

    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}          # the one endpoint without a key
    assert httpx.get(f"{base}/readyz").status_code == 401
    assert post(base, "/v1/ask", {"question": 42}).status_code == 422
    too_big = httpx.post(f"{base}/v1/ask", content=b" " * (2 << 20), headers=AUTH, timeout=60)
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "request_too_large"
    assert {"/v1/ask", "/v1/chat/completions"} <= set(httpx.get(f"{base}/openapi.json", headers=AUTH).json()["paths"])
    assert "ragrt_requests_total" in httpx.get(f"{base}/metrics", headers=AUTH).text


@pytest.mark.ray
def test_the_openai_client(base, engine):
    openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="k-123", max_retries=0)
    messages = [{"role": "user", "content": QUESTION}]
    ref = engine.ask(QUESTION, max_new_tokens=8)
    done = client.chat.completions.create(model="ragrt", messages=messages, max_tokens=8)
    assert done.choices[0].message.content == ref.answer
    chunks = list(client.chat.completions.create(model="ragrt", messages=messages, max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == ref.answer
    assert chunks[-1].model_extra["sources"]


@pytest.mark.ray
def test_two_replicas_take_the_soak_mix_without_a_5xx(base):
    results, lock, stop = [], threading.Lock(), time.monotonic() + 15

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as http:
            while time.monotonic() < stop:
                method, path, body = rng.choice(VALID if rng.random() < 0.6 else INVALID)
                try:
                    if isinstance(body, bytes):
                        r = http.request(method, path, content=body, headers={"content-type": "application/json"})
                    else:
                        r = http.request(method, path, json=body)
                    status = f"{r.status_code // 100}xx"
                except httpx.TransportError as e:
                    status = f"transport:{type(e).__name__}"
                with lock:
                    results.append(status)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    classes = Counter(results)
    assert set(classes) == {"2xx", "4xx"}, classes


@pytest.mark.ray
def test_a_replica_killed_under_load_loses_no_request(ray, base):
    """Each of 20 concurrent requests is answered or refused cleanly (a JSON 503), never left hanging."""
    from ray import serve

    from ragrt.serve.ray_app import APP_NAME
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]]
    assert len(replicas) == 2

    def ask(i: int) -> tuple[int, dict]:
        # Long answers (no EOS before 200 tokens), so the kill lands while most are decoding.
        r = post(base, "/v1/ask", {"question": f"{QUESTION} ({i})", "max_new_tokens": 200, "min_new_tokens": 200})
        return r.status_code, r.json()

    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(ask, i) for i in range(20)]
        end = time.monotonic() + 5                 # the replicas are busy once the first answer is back
        while not any(f.done() for f in futures) and time.monotonic() < end:
            time.sleep(0.02)
        assert sum(f.done() for f in futures) < len(futures) / 2, "the kill must come while requests run"
        victim = replicas[0]
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        answers = [f.result(timeout=120) for f in futures]
    statuses = Counter(status for status, _ in answers)
    assert set(statuses) <= {200, 503} and statuses[200] > 0, statuses
    assert all(body["error"]["type"] == "replica_unavailable" for status, body in answers if status == 503)
    # Serve replaces the dead replica; the application serves on.
    end = time.monotonic() + 120
    while serve.status().applications[APP_NAME].status != "RUNNING" and time.monotonic() < end:
        time.sleep(0.5)
    assert post(base, "/v1/ask", {"question": QUESTION, "max_new_tokens": 4}).status_code == 200


def test_without_ray_the_flag_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from ragrt.cli import main; "
            f"sys.exit(main(['serve', '--bundle', {str(tmp_path)!r}, '--ray', '--replicas', '2']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ragrt: error: ragrt serve --ray needs the ray extra (ray is missing): pip install 'ragrt[ray]'"]


def test_replicas_need_ray(tmp_path, capsys):
    from ragrt.cli import main
    assert main(["serve", "--bundle", str(tmp_path), "--replicas", "2"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().err


@pytest.mark.ray
def test_a_new_user_config_swaps_the_engine_in_place(ray, tiny_bundle):
    """The rolling bundle update's in-place path: the old engine answers its request in flight,
    then closes; the replica answers from the new one."""
    import asyncio

    from ragrt.errors import UserInputError
    from ragrt.serve.ray_app import EngineReplica, server_config
    replica = EngineReplica.func_or_class()
    settings = {"bundle": str(tiny_bundle), "threads": 1}

    async def swap():
        await replica.reconfigure(settings)
        old = replica._current
        in_flight = replica.http("GET", "/readyz", b"", [], b"")
        start = await anext(in_flight)
        await replica.reconfigure({**settings, "max_batch": 2})
        assert replica._current is not old and old.app.state.services.batcher._thread.is_alive()
        assert start["status"] == 200 and [m["type"] async for m in in_flight] == ["http.response.body"]
        old.app.state.services.batcher._thread.join(10)
        assert not old.app.state.services.batcher._thread.is_alive()
        assert replica._current.app.state.services.config.max_batch == 2

    asyncio.run(swap())
    with pytest.raises(UserInputError, match="unknown server settings \\['replicas'\\]"):
        server_config({**settings, "replicas": 2})

"""The rough edges a new user hit (issue 31), each as they met it: a stopped stream, a prompt over
its budget, a lower-case bearer, a silent `index add` and `serve`, regex and union-validation
messages, the curl examples of `ragrt serve --help`, and `ragrt info`'s schema number."""
import json
import shlex
import shutil
import subprocess
import sys
import threading

import httpx
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ragrt import Engine
from ragrt.bundle.manifest import SCHEMA_VERSION
from ragrt.cli import SERVE_EPILOG, main
from ragrt.decoding.prompt import PromptBuilder
from ragrt.retrieval.passages import Passage
from ragrt.serve.app import ServerConfig, create_app
from conftest import TINY_CORPUS
from serving import running_server
from test_serve_cli import ROOT, free_port, stop_server
from tiny import TEXT

QUESTION = "How do I copy a list?"


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.open(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def base(tiny_bundle):
    with running_server(create_app(ServerConfig(bundle=str(tiny_bundle), threads=1))) as url:
        yield url


def a_stop_after_a_space(text: str) -> str:
    """Two characters that first occur right after whitespace in `text`: stopping there leaves the
    decoded text ending in whitespace."""
    for i, ch in enumerate(text[:-2]):
        stop = text[i + 1:i + 3]
        if ch.isspace() and not stop[0].isspace() and text.find(stop) == i + 1:
            return stop
    raise AssertionError(f"no stop string to pick in {text!r}")


def sse_events(text):
    return [dict(line.split(": ", 1) for line in block.splitlines()) for block in text.strip().split("\n\n")]


def test_a_stopped_stream_is_the_answer(engine, base):
    plain = engine.ask(QUESTION, max_new_tokens=64, k=2)
    stop = a_stop_after_a_space(plain.answer)
    stream = engine.stream(QUESTION, max_new_tokens=64, k=2, stop=[stop])
    pieces = list(stream)
    assert "".join(pieces) == stream.answer.answer == plain.answer[:plain.answer.find(stop)].strip()
    body = {"question": QUESTION, "max_new_tokens": 64, "k": 2, "stop": [stop], "stream": True}
    events = sse_events(httpx.post(f"{base}/v1/ask", json=body, timeout=60).text)
    streamed = "".join(json.loads(e["data"])["text"] for e in events if e.get("event") == "token")
    assert streamed == json.loads(events[-1]["data"])["answer"] == stream.answer.answer


def test_sources_are_the_passages_the_prompt_holds(engine):
    """A long question leaves room for only some of the k passages: the prompt stays within
    max_context - max_new_tokens, and the sources and the warning say which passages it holds."""
    context, new = engine.manifest.generator.max_context, 200
    question = "How do I copy a list of tuples? " * 60
    ans = engine.ask(question, k=5, max_new_tokens=new)
    assert ans.prompt_tokens <= context - new
    assert 1 <= len(ans.sources) < 5
    held = engine.prepare(question, k=5, max_new_tokens=new)
    assert [s.id for s in ans.sources] == [s.id for s in held.sources[:len(ans.sources)]]
    dropped = 5 - len(ans.sources)
    assert any(f"{dropped} of the 5 passages" in w for w in ans.warnings), ans.warnings


def merging_tokenizer():
    """A byte-level BPE with one token for a lone "\n\n", as real ones have (SmolLM2's does). Inside
    text the pre-tokenizer splits "\n\nTitle" into "\n", "\n", "Title", so each passage separator
    costs one token more in the prompt than counted alone: 17 tokens over at k=50 on the demo."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] + ["\n\n"] * 50,
                            trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_the_prompt_never_exceeds_its_budget(engine):
    tok = merging_tokenizer()
    count = lambda text: len(tok.encode(text).ids)   # noqa: E731
    assert count("a.\n\nLists") == count("a.") + count("\n\n") + count("Lists") + 1
    passages = [Passage(f"{d['id']}#{i}", d["title"], d["text"]) for i in range(3) for d in TINY_CORPUS]
    for budget in range(340, 640, 3):
        built = PromptBuilder(engine.manifest.prompt, tok, budget=budget).build(QUESTION, passages)
        assert len(built.ids) <= budget
        assert built.passages_used < len(passages)


def test_the_bearer_scheme_is_case_insensitive(tiny_bundle, tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    app = create_app(ServerConfig(bundle=str(tiny_bundle), threads=1, api_key_file=str(key)))
    with running_server(app, headers={"Authorization": "Bearer s3cret"}) as url:
        for header, status in [("bearer s3cret", 200), ("BEARER  s3cret", 200), ("Bearer s3cre", 401),
                               ("Basic s3cret", 401), ("bearer", 401)]:
            assert httpx.get(f"{url}/readyz", headers={"Authorization": header}).status_code == status, header


@pytest.mark.parametrize("question", ["", "   ", "\x00\x01"])
def test_an_empty_question_says_so_over_http(base, question):
    r = httpx.post(f"{base}/v1/ask", json={"question": question}, timeout=60)
    assert r.status_code == 422
    assert r.json()["error"]["message"] == "question: the question is empty"


@pytest.mark.parametrize("stop", [[""], ["x" * 257], ""])
def test_an_empty_stop_string_gets_one_short_message(base, stop):
    r = httpx.post(f"{base}/v1/ask", json={"question": QUESTION, "stop": stop}, timeout=60)
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert message.startswith("stop: ") and "1 to 256 characters" in message and len(message) < 120, message


def curl_requests(epilog: str):
    """The (url, headers, body) of every `curl ... -d` example in `epilog`."""
    for line in epilog.replace("\\\n", " ").splitlines():
        words = shlex.split(line.strip())
        if not words or words[0] != "curl" or "-d" not in words:
            continue
        url = next(w for w in words[1:] if not w.startswith("-") and words[words.index(w) - 1] not in ("-H", "-d"))
        headers = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
        yield url, headers, words[words.index("-d") + 1]


def test_the_curl_examples_of_serve_help_work(base):
    requests = list(curl_requests(SERVE_EPILOG))
    assert len(requests) >= 2
    for url, headers, body in requests:
        # curl sends a body given with -d as a form unless a header says otherwise.
        headers = {"content-type": "application/x-www-form-urlencoded", **headers}
        r = httpx.post(url.replace("localhost:8000", base), headers=headers,
                       content=body.encode(), timeout=60)
        assert r.status_code == 200, (body, r.text)


def test_index_add_shows_its_progress(tiny_bundle, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    corpus = tmp_path / "new.jsonl"
    corpus.write_text(json.dumps({"id": "sets", "text": "A set holds each value once; set(a) removes duplicates."}) + "\n")
    assert main(["index", "add", "--bundle", str(bundle), "--corpus", str(corpus), "--threads", "1"]) == 0
    assert "embedding passages" in capsys.readouterr().err


def test_serve_prints_one_line_when_ready(tiny_bundle):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ragrt", "serve", "--bundle", str(tiny_bundle), "--port",
                               str(port), "--threads", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        # A server that never says it is ready fails here instead of hanging the suite.
        timer = threading.Timer(120, stop_server, [server])
        timer.start()
        line = server.stdout.readline()
        timer.cancel()
        assert line.startswith(f"ragrt serve: ready on http://127.0.0.1:{port}/ ")
        assert str(tiny_bundle) in line and "passage KV" in line
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    finally:
        stop_server(server)


def test_info_explains_its_schema_number(tiny_bundle, capsys):
    assert main(["info", str(tiny_bundle)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"this ragrt reads up to {SCHEMA_VERSION}" in first, first

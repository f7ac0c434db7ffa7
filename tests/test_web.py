"""The web page of `ragrt serve` in a real browser: Debian's chromium, driven by playwright's Python
API (its own browser download does not work here). The real server runs on the tiny bundle.

`python tests/test_web.py BUNDLE OUT.png` asks the demo question in the page and saves the
screenshot that docs/web.md shows."""
import json
import sys
from pathlib import Path

import httpx
import pytest

from ragrt import Engine
from ragrt.options import MODES, PASSAGE_KV_MODES
from ragrt.serve.app import ServerConfig, create_app
from serving import running_server

CHROMIUM = Path("/usr/bin/chromium")
QUESTION = "How do I copy a list?"
SOURCES = "document.querySelectorAll('[data-testid=source]').length"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed: apt-get install chromium (make test does it)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.open(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def base(tiny_bundle):
    with running_server(create_app(ServerConfig(bundle=str(tiny_bundle), threads=1))) as url:
        yield url


def open_page(browser, base):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(f"{base}/")
    page.wait_for_function("() => document.querySelector('#mode').options.length > 0")
    return page


def ask(page, question: str, *, k: int | None = None) -> None:
    """Types the question, clicks ask, and waits for the sources (they come with the final answer)."""
    page.get_by_test_id("question").fill(question)
    if k is not None:
        page.fill("#k", str(k))
    page.get_by_test_id("ask").click()
    page.wait_for_function(f"() => {SOURCES} > 0", timeout=120_000)


def marks(locator) -> list[str]:
    return locator.locator("mark").all_text_contents()


def test_asks_streams_and_lists_the_sources(browser, base, engine, tmp_path):
    page = open_page(browser, base)
    assert page.eval_on_selector_all("#mode option", "os => os.map(o => o.value)") == list(MODES)
    assert page.eval_on_selector_all("#passage_kv option", "os => os.map(o => o.value)") == list(PASSAGE_KV_MODES)
    # Each piece of the stream changes the answer as it arrives, before the sources come.
    page.evaluate("""() => { window.changes = 0;
        new MutationObserver(rs => { window.changes += rs.length; })
            .observe(document.querySelector('[data-testid=answer]'), {childList: true}); }""")
    ask(page, QUESTION, k=3)
    expected = engine.ask(QUESTION, k=3)
    assert page.get_by_test_id("answer").text_content() == expected.answer
    assert page.evaluate("window.changes") > 2
    sources = page.get_by_test_id("source")
    assert sources.count() == len(expected.sources) == 3
    assert sources.locator(".id").all_text_contents() == [s.id for s in expected.sources]
    # Answers of issue 28 carry quotes: then the page marks each quoted span.
    body = httpx.post(f"{base}/v1/ask", json={"question": QUESTION, "k": 3}, timeout=60).json()
    for i, source in enumerate(body["sources"]):
        assert marks(sources.nth(i)) == [source["text"][a:b] for a, b in
                                         sorted(q["passage"] for q in source.get("quotes", []))]
    page.screenshot(path=tmp_path / "web.png", full_page=True)
    assert (tmp_path / "web.png").stat().st_size > 10_000


def test_marks_the_quoted_spans(browser, base):
    """An answer with quotes, served in place of the server's, is marked in the answer and its source."""
    text, said = "Use list.copy() or a slice a[:] to copy a list.", "Call list.copy() or take a[:]."
    quotes = [{"answer": [said.index(q), said.index(q) + len(q)], "passage": [text.index(q), text.index(q) + len(q)]}
              for q in ("list.copy()", "a[:]")]
    answer = {"answer": said, "new_tokens": 9, "prompt_tokens": 40, "mode": "concat", "timings_ms": {"total": 12.0},
              "warnings": [], "finish_reason": "stop", "passage_kv": None, "log_prob": None,
              "sources": [{"id": "lists#0", "title": "Lists", "score": 0.9, "prob": 1.0, "text": text, "quotes": quotes}]}
    events = (f"event: token\ndata: {json.dumps({'text': answer['answer']})}\n\n"
              f"event: answer\ndata: {json.dumps(answer)}\n\n")
    page = open_page(browser, base)
    page.route("**/v1/ask", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=events))
    ask(page, QUESTION)
    assert marks(page.get_by_test_id("answer")) == ["list.copy()", "a[:]"]
    assert marks(page.get_by_test_id("source")) == ["list.copy()", "a[:]"]


def test_an_error_is_shown(browser, base):
    page = open_page(browser, base)
    page.get_by_test_id("question").fill("   ")
    page.get_by_test_id("ask").click()
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('the question is empty')")
    assert page.get_by_test_id("source").count() == 0


def test_the_page_asks_for_the_api_key(browser, tiny_bundle, tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    app = create_app(ServerConfig(bundle=str(tiny_bundle), threads=1, api_key_file=str(key)))
    with running_server(app, headers={"Authorization": "Bearer s3cret"}) as url:
        assert httpx.get(f"{url}/").status_code == 200           # the page holds no data
        assert httpx.get(f"{url}/v1/options").status_code == 401
        page = browser.new_page()
        page.goto(f"{url}/")
        page.wait_for_selector("#keyrow:not([hidden])")
        page.fill("#key", "s3cret")
        page.locator("#key").blur()                              # the page then loads its choices
        page.wait_for_function("() => document.querySelector('#mode').options.length > 0")
        ask(page, QUESTION, k=2)
        assert page.get_by_test_id("source").count() == 2


def test_no_web_turns_the_page_off(tiny_bundle):
    app = create_app(ServerConfig(bundle=str(tiny_bundle), threads=1, web=False))
    with running_server(app) as url:
        assert httpx.get(f"{url}/").status_code == 404
        assert httpx.get(f"{url}/v1/options").json()["modes"] == list(MODES)


def main(bundle: str, out: str) -> None:
    from playwright.sync_api import sync_playwright
    with running_server(create_app(ServerConfig(bundle=bundle))) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = open_page(browser, url)
        ask(page, "How do I remove duplicates from a list while keeping the order?")
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:])

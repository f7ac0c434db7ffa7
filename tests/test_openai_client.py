"""The official `openai` client, pointed at the server, gets completions and streams unchanged."""
import pytest

from ragrt import Engine
from ragrt.serve.app import ServerConfig, create_app
from serving import running_server

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.open(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def client(tiny_bundle, engine, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text("k-123")
    app = create_app(ServerConfig(bundle=str(tiny_bundle), api_key_file=str(key_file)), engine)
    with running_server(app, headers={"Authorization": "Bearer k-123"}) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="k-123", max_retries=0)


MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is a tuple?"},
            {"role": "assistant", "content": "An immutable sequence."},
            {"role": "user", "content": "How do I copy a list?"}]


def test_completion(client, engine):
    done = client.chat.completions.create(model="ragrt", messages=MESSAGES, max_tokens=8)
    ref = engine.ask("How do I copy a list?", max_new_tokens=8, history=MESSAGES[1:3])
    assert done.choices[0].message.content == ref.answer
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens == ref.new_tokens
    assert [s["id"] for s in done.model_extra["sources"]] == [s.id for s in ref.sources]


def test_stream(client, engine):
    chunks = list(client.chat.completions.create(model="ragrt", messages=MESSAGES, max_tokens=8, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == engine.ask("How do I copy a list?", max_new_tokens=8, history=MESSAGES[1:3]).answer
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["sources"]


def test_models_and_errors_reach_the_client(client):
    assert client.models.list().data[0].owned_by == "ragrt"
    with pytest.raises(openai.UnprocessableEntityError, match="last message must be the user"):
        client.chat.completions.create(model="ragrt", messages=MESSAGES[:3])
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="ragrt", messages=MESSAGES)


def test_sampling_options_are_honoured(client, engine):
    """Two seeds at temperature 1 give different completions; temperature 0 gives greedy's, every time."""
    def complete(**options) -> str:
        return client.chat.completions.create(model="ragrt", messages=MESSAGES, max_tokens=16, **options
                                              ).choices[0].message.content

    greedy = engine.ask("How do I copy a list?", max_new_tokens=16, history=MESSAGES[1:3]).answer
    assert complete(temperature=0) == complete(temperature=0) == greedy
    one, two = complete(temperature=1, seed=1), complete(temperature=1, seed=2)
    assert one != two
    assert complete(temperature=1, seed=1) == one
    assert complete(temperature=1, seed=1, top_p=1e-6) == greedy    # only the likeliest token is left
    stop = greedy[3:5]
    assert complete(temperature=0, stop=[stop]) == greedy[:greedy.index(stop)].strip()
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        complete(temperature=3)

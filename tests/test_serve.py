"""The HTTP API in-process (TestClient), one real server for the official openai client, and the engine."""

import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient

import gptkit
from gptkit import GPT, SamplingParams, preset
from gptkit.engine import Engine, Request, generate_tokens
from gptkit.serve import Runner, create_app


@pytest.fixture
def lm(tiny_ckpt):
    return gptkit.load(tiny_ckpt)


@pytest.fixture
def client(lm):
    with TestClient(create_app(lm, "tiny")) as c:
        yield c


def sse(response) -> list[dict]:
    lines = [line for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models_health_and_openapi(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/health").json()["status"] == "ok"
    assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]


def test_completion_matches_library_generation(client, lm):
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": "The quick", "max_tokens": 12,
                                                 "temperature": 0}).json()
    assert body["choices"][0]["text"] == lm.generate("The quick", max_new_tokens=12, temperature=0)
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["prompt_tokens"] == len(lm.tokenizer.encode("The quick"))
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_streaming_completion_chunks_join_to_the_text(client):
    req = {"model": "tiny", "prompt": "def add", "max_tokens": 15, "temperature": 0}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    chunks = sse(client.post("/v1/completions", json=req | {"stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_with_n_seed_and_stop(client):
    req = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "n": 2, "seed": 3}
    a = client.post("/v1/chat/completions", json=req).json()
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert a == client.post("/v1/chat/completions", json=req).json() | {"id": a["id"], "created": a["created"]}
    text = a["choices"][0]["message"]["content"]
    if len(text) > 4:
        stop = text[2:4]
        cut = client.post("/v1/chat/completions", json=req | {"stop": stop}).json()
        assert cut["choices"][0]["message"]["content"] == text[:text.index(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"


def test_streaming_chat_format(client):
    chunks = sse(client.post("/v1/chat/completions", json={"model": "tiny", "stream": True, "max_tokens": 5,
                                                           "messages": [{"role": "user", "content": "hello"}]}))
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("kwargs, status, fragment", [
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "malformed JSON"),
    (dict(json={"model": "tiny", "prompt": 5}), 400, "prompt"),
    (dict(json={"model": "tiny", "prompt": "x", "temperature": -1}), 400, "temperature"),
    (dict(json={"model": "tiny", "prompt": "x", "top_p": 0}), 400, "top_p"),
    (dict(json={"model": "tiny", "prompt": "x", "max_tokens": 10_000}), 400, "exceeds the model's context"),
    (dict(json={"model": "gpt-4", "prompt": "x"}), 404, "does not exist"),
    (dict(json={"prompt": "x"}), 400, "model"),
])
def test_bad_requests_get_openai_style_4xx(client, kwargs, status, fragment):
    r = client.post("/v1/completions", **kwargs)
    assert r.status_code == status
    assert fragment in r.json()["error"]["message"]


def test_chat_rejects_unknown_roles(client):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]


def test_api_key(lm):
    with TestClient(create_app(lm, "tiny", api_key="sekrit")) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_sixteen_concurrent_streams_are_batched(client):
    results = [None] * 16

    def one(i):
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": f"item {i}", "max_tokens": 20,
                                                 "stream": True, "seed": i})
        results[i] = sse(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r and r[-1]["choices"][0]["finish_reason"] for r in results)
    assert client.app.state.runtime["engine"].max_rows > 1  # decoded together, not one after another


def test_engine_thread_batched_greedy_equals_single_generation(bpe):
    torch.manual_seed(0)
    model = GPT(preset("tiny-modern", vocab_size=bpe.vocab_size, context=64)).eval()
    runner = Runner(Engine(model, bpe, max_batch=4), max_queue=8, timeout=60)
    prompts = [[5, 6, 7], [9] * 9, [11, 12]]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    texts, finished, done = ["", "", ""], [], threading.Event()

    def collector(i):
        def on_event(e):
            texts[i] += e.text
            if e.finish_reason:
                finished.append(i)
                if len(finished) == len(prompts):
                    done.set()
        return on_event

    for i, p in enumerate(prompts):
        runner.submit(Request(p, params), collector(i))
    assert done.wait(30)
    runner.close()
    assert runner.engine.max_rows >= 2
    assert texts == [bpe.decode(generate_tokens(model, [p], params)[0]) for p in prompts]


def test_disconnected_client_frees_its_slot(lm):
    app = create_app(lm, "tiny")
    with TestClient(app) as c:
        with c.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 50,
                                                       "stream": True}) as r:
            for _ in r.iter_lines():
                break  # read one line, then hang up
        engine = app.state.runtime["engine"]
        for _ in range(100):
            if not engine.rows:
                break
            threading.Event().wait(0.05)
        assert not engine.rows


def test_stream_usage_when_asked(client):
    chunks = sse(client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 7, "stream": True,
                                                      "temperature": 0, "stream_options": {"include_usage": True}}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 7

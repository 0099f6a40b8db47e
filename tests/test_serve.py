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


# --- regressions: faults and OpenAI parameters -------------------------------------------------------------
def completion(client, **fields):
    return client.post("/v1/completions", json={"model": "tiny", "prompt": "The quick", "max_tokens": 5} | fields)


@pytest.mark.parametrize("seed, n", [(99999999999999999999999, 1), (-(1 << 63) - 1, 1), (1e23, 1)])
def test_seed_beyond_64_bits_is_refused_and_the_engine_keeps_serving(client, seed, n):
    r = completion(client, seed=seed, n=n)
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"]
    assert completion(client).status_code == 200


def test_seed_near_2_64_with_n_wraps_instead_of_overflowing(client):
    r = completion(client, seed=(1 << 64) - 1, n=3)
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    assert completion(client).status_code == 200


def emitting(ckpt, token: int):
    """The checkpoint's model rewired so that `token` is always the most likely next token."""
    lm = gptkit.load(ckpt)
    model = GPT(lm.model.config.__class__(**lm.model.config.to_dict() | {"tie_embeddings": False})).eval()
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.copy_(torch.randn(model.config.n_embd))  # every final hidden state is this vector
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = model.norm_f.bias
    return gptkit.LM(model, lm.tokenizer)


def test_completion_stops_at_endoftext(tiny_ckpt):
    lm = gptkit.load(tiny_ckpt)
    with TestClient(create_app(emitting(tiny_ckpt, lm.tokenizer.eot_id), "tiny")) as c:
        body = completion(c, max_tokens=20).json()
        assert body["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
        assert body["usage"]["completion_tokens"] == 1
        chunks = sse(completion(c, max_tokens=20, stream=True))
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_raw_completions_never_print_special_tokens(tiny_ckpt):
    lm = gptkit.load(tiny_ckpt)
    with TestClient(create_app(emitting(tiny_ckpt, lm.tokenizer.special["<|im_end|>"]), "tiny")) as c:
        choice = completion(c, max_tokens=6).json()["choices"][0]
        assert choice["text"] == "" and choice["finish_reason"] == "length"


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(client, monkeypatch):
    engine = client.app.state.runtime["engine"]
    real, calls = engine._sample, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected device error")
        return real(*args)

    monkeypatch.setattr(engine, "_sample", flaky)
    r = completion(client)
    assert r.status_code == 500 and r.json()["error"] == {
        "message": "decoding failed: injected device error", "type": "server_error", "param": None, "code": None}
    assert completion(client).status_code == 200
    assert client.get("/health").status_code == 200


def test_full_queue_answers_429_with_retry_after(lm, monkeypatch):
    app = create_app(lm, "tiny", max_batch=1, max_queue=1)
    gate, entered = threading.Event(), threading.Event()
    with TestClient(app) as c:
        engine = app.state.runtime["engine"]
        real = engine.step

        def held():
            if engine.has_work():
                entered.set()
                gate.wait(10)
            return real()

        monkeypatch.setattr(engine, "step", held)
        statuses = []
        first = threading.Thread(target=lambda: statuses.append(completion(c).status_code))
        first.start()
        assert entered.wait(10)  # the first request holds the only row
        second = threading.Thread(target=lambda: statuses.append(completion(c).status_code))
        second.start()
        for _ in range(100):  # the second waits in the queue
            if app.state.runtime["runner"].inbox.qsize():
                break
            threading.Event().wait(0.02)
        r = completion(c)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        gate.set()
        first.join(), second.join()
        assert statuses == [200, 200]


def test_request_timeout_answers_504(lm):
    with TestClient(create_app(lm, "tiny", request_timeout=0)) as c:
        r = completion(c, max_tokens=40)
        assert r.status_code == 504 and "limit" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200


def test_health_reports_a_stopped_engine(lm):
    app = create_app(lm, "tiny")
    with TestClient(app) as c:
        app.state.runtime["runner"].close()
        assert c.get("/health").status_code == 503
        assert completion(c).status_code == 503


def test_library_chat_and_server_give_the_same_greedy_text(client, lm):
    from gptkit.chat import ChatSession

    server = completion(client, prompt="def add", max_tokens=12, temperature=0).json()["choices"][0]["text"]
    assert server == lm.generate("def add", max_new_tokens=12, temperature=0)
    reply = "".join(ChatSession(lm, max_new_tokens=12, temperature=0, top_p=None).send("hello"))
    chat = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 12, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "hello"}]}).json()
    assert chat["choices"][0]["message"]["content"] == reply


def test_logprobs_equal_log_softmax_of_the_model_logits(client, lm):
    prompt = lm.tokenizer.encode("def add")
    body = completion(client, prompt=prompt, max_tokens=6, temperature=0, logprobs=3).json()
    got = body["choices"][0]["logprobs"]
    ids = generate_tokens(lm.model, [prompt], SamplingParams(max_new_tokens=6, temperature=0))[0]
    with torch.no_grad():
        expected = lm.model(torch.tensor([prompt + ids]))[0, len(prompt) - 1:-1].log_softmax(-1)
    want = expected.gather(1, torch.tensor(ids)[:, None]).squeeze(1).tolist()
    assert got["tokens"] == [lm.tokenizer.decode([t]) for t in ids]
    assert got["token_logprobs"] == pytest.approx(want, abs=1e-4)
    assert all(len(top) <= 3 and max(top.values()) >= lp - 1e-5 for top, lp in zip(got["top_logprobs"], want))
    chat = client.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 4, "logprobs": True, "top_logprobs": 2,
        "messages": [{"role": "user", "content": "hi"}]}).json()["choices"][0]["logprobs"]["content"]
    assert chat and all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in chat)


def test_prompt_lists_token_ids_and_echo(client, lm):
    one = completion(client, prompt="The quick", temperature=0).json()["choices"][0]["text"]
    ids = lm.tokenizer.encode("The quick")
    many = completion(client, prompt=["The quick", "def"], n=2, temperature=0).json()["choices"]
    assert [c["index"] for c in many] == [0, 1, 2, 3] and many[0]["text"] == many[1]["text"] == one
    assert completion(client, prompt=ids, temperature=0).json()["choices"][0]["text"] == one
    assert completion(client, prompt=[ids], temperature=0).json()["choices"][0]["text"] == one
    echoed = completion(client, prompt="The quick", temperature=0, echo=True).json()["choices"][0]["text"]
    assert echoed == "The quick" + one
    for bad in ([], [[]], [10**9], [-1]):
        assert completion(client, prompt=bad).status_code == 400


@pytest.mark.parametrize("fields, fragment", [({"num_beams": 3}, "beam search"), ({"presence_penalty": 3}, "presence"),
                                               ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"top_k": 0}, "top_k")])
def test_settings_the_server_cannot_honour_are_refused(client, fields, fragment):
    r = completion(client, **fields)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


def test_penalties_and_extra_settings_are_applied(client, lm):
    plain = completion(client, prompt="def", max_tokens=20, temperature=0).json()["choices"][0]["text"]
    for extra in ({"frequency_penalty": 2}, {"presence_penalty": 2}, {"repetition_penalty": 5.0}):
        text = completion(client, prompt="def", max_tokens=20, temperature=0, **extra).json()["choices"][0]["text"]
        assert text == lm.generate("def", max_new_tokens=20, temperature=0, **extra)
        assert text != plain


def test_metrics_in_prometheus_format(client):
    completion(client, max_tokens=4, temperature=0)
    text = client.get("/metrics").text
    for name in ("gptkit_requests_total", "gptkit_generated_tokens_total", "gptkit_queue_depth",
                 "gptkit_running_rows", "gptkit_time_to_first_token_seconds_bucket",
                 "gptkit_time_per_output_token_seconds_bucket"):
        assert name in text
    assert 'gptkit_requests_total{endpoint="text",outcome="finished"} 1.0' in text


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_step_failing_in_prefill_or_decode_hands_back_every_request_it_held(bpe, where):
    """Before, a prefill that raised lost the requests it had taken from the queue, and a decode pass that raised
    lost the rows that had just finished in that step: `abort` returned neither, and their clients waited for the
    request timeout."""
    torch.manual_seed(0)
    model = GPT(preset("tiny-modern", vocab_size=bpe.vocab_size, context=64)).eval()
    engine = Engine(model, bpe, max_batch=4)
    one_token = engine.add(Request([5, 6], SamplingParams(max_new_tokens=1, temperature=0)))  # ends in step 1
    going = engine.add(Request([7, 8, 9], SamplingParams(max_new_tokens=10, temperature=0)))

    def failing(*args):
        raise RuntimeError(f"injected {where} failure")

    setattr(engine.stepper, where, failing)  # (an instance attribute: the model's cached stepper is shared)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()
    finally:
        delattr(engine.stepper, where)
    assert {r.id for r in engine.abort()} == {one_token.id, going.id}
    assert not engine.has_work()
    engine.add(Request([5, 6], SamplingParams(max_new_tokens=3, temperature=0)))
    assert len([o for _ in range(3) for o in engine.step()]) == 3  # and the engine keeps working


def test_a_non_streaming_client_that_hangs_up_frees_its_row_at_once(lm):
    """Before, a non-streaming request looked for a disconnected client only after a second without events, so on
    a busy engine it ran its whole max_tokens for nobody."""
    import asyncio

    app = create_app(lm, "tiny")
    with TestClient(app):  # the lifespan (the engine thread) runs
        engine = app.state.runtime["engine"]
        real, steps = engine.step, []

        def slow_step():
            steps.append(1)
            threading.Event().wait(0.05)  # 60 tokens take 3 s
            return real()

        engine.step = slow_step
        body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 60, "temperature": 0}).encode()

        async def hang_up_after_a_few_steps():
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                if messages:
                    return messages.pop()
                while len(steps) < 5:
                    await asyncio.sleep(0.01)
                return {"type": "http.disconnect"}

            async def send(message):
                pass

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                     "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
                     "client": ("test", 1), "server": ("test", 80)}
            await app(scope, receive, send)

        asyncio.run(hang_up_after_a_few_steps())
        for _ in range(100):
            if not engine.rows:
                break
            threading.Event().wait(0.02)
        assert not engine.rows and len(steps) < 30  # freed within a few steps of the hang-up, not after 60


def test_the_kv_budget_is_on_metrics_and_a_prompt_past_it_is_a_400(lm):
    per_token = 2 * lm.model.config.n_layer * lm.model.config.kv_heads * lm.model.config.head_dim * 4
    with TestClient(create_app(lm, "tiny", kv_memory=48 * per_token)) as c:  # 3 blocks of 16
        assert completion(c, max_tokens=5).status_code == 200
        text = c.get("/metrics").text
        assert "gptkit_kv_blocks 3.0" in text and "gptkit_kv_blocks_in_use 0.0" in text
        r = completion(c, prompt=[1] * 40, max_tokens=20)
        assert r.status_code == 400 and "KV cache's whole budget of 48 tokens" in r.json()["error"]["message"]


def test_serve_takes_a_kv_memory_size():
    from gptkit.cli.flags import UsageError, byte_size

    assert byte_size("2G", "f") == 2 << 30 and byte_size("512M", "f") == 512 << 20 and byte_size("1000", "f") == 1000
    assert byte_size("1.5gb", "f") == 3 << 29
    with pytest.raises(UsageError, match="--kv-memory must be a size"):
        byte_size("lots", "--kv-memory")


def test_response_format_json_schema_and_json_object_are_honoured(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    for body in ({"messages": [{"role": "user", "content": "answer"}], "max_tokens": 40, "n": 3, "seed": 1},
                 {"messages": [{"role": "user", "content": [{"type": "text", "text": "answer"}]}], "max_tokens": 40}):
        r = client.post("/v1/chat/completions", json={"model": "tiny", "response_format": fmt, **body})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] == "stop"
            reply = json.loads(choice["message"]["content"])
            assert set(reply) == {"ok", "n"} and isinstance(reply["ok"], bool) and reply["n"] <= 99
    r = completion(client, max_tokens=40, response_format={"type": "json_object"}, temperature=0)
    assert r.status_code == 200
    text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))


def test_settings_the_server_does_not_implement_are_refused_by_name(client):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}
    for extra, field in [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"logit_bias": {"5": 10}}, "logit_bias"),
                         ({"response_format": {"type": "yaml"}}, "response_format"),
                         ({"response_format": bad_schema}, "response_format")]:
        r = client.post("/v1/chat/completions", json=chat | extra)
        assert r.status_code == 400 and field in (r.json()["error"]["param"] or "") + r.json()["error"]["message"], r.text


def test_prompt_logprobs_as_lm_eval_local_completions_asks_for_them(client, lm):
    """lm-eval's `local-completions` scores a continuation with echo + logprobs (max_tokens 1, or 0) and sums
    token_logprobs[ctxlen:-1]: before, every such request was a 400."""
    ids = [lm.tokenizer.encode("The quick brown fox"), lm.tokenizer.encode("def add(a, b): return")]
    with torch.no_grad():
        expected = [[lp.item() for lp in lm.model(torch.tensor([p]))[0].log_softmax(-1)[
            torch.arange(len(p) - 1), torch.tensor(p[1:])]] for p in ids]
    payload = {"model": "tiny", "prompt": ids, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    for max_tokens in (1, 0):
        r = client.post("/v1/completions", json=payload | {"max_tokens": max_tokens})
        assert r.status_code == 200, r.text
        for choice, p, want in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), ids, expected):
            block = choice["logprobs"]
            assert len(block["token_logprobs"]) == len(p) + max_tokens and block["token_logprobs"][0] is None
            torch.testing.assert_close(block["token_logprobs"][1:len(p)], want, atol=1e-4, rtol=0)
            ctxlen = 2
            assert sum(block["token_logprobs"][ctxlen:-1]) == pytest.approx(sum(want[ctxlen - 1:len(p) - 1 - (max_tokens == 0)]), abs=1e-3)
            top = block["top_logprobs"][1]
            assert len(top) == 1 and max(top.values()) >= block["token_logprobs"][1] - 1e-6
            assert choice["text"].startswith(lm.tokenizer.decode(p)) and block["text_offset"][0] == 0
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"

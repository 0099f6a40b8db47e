"""A real uvicorn server on loopback: the official openai client, and the chat page in headless Chromium."""

import shutil
import socket
import threading
import time

import pytest
import uvicorn

import gptkit
from gptkit.serve import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def server(tmp_path, bpe):
    from gptkit import GPT, checkpoint, preset

    checkpoint.save(tmp_path / "ckpt", GPT(preset("tiny-gpt2", vocab_size=bpe.vocab_size)), bpe)  # context 256

    def start(api_key=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = create_app(gptkit.load(tmp_path / "ckpt"), "tiny", api_key=api_key)
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        for _ in range(100):
            if srv.started:
                break
            time.sleep(0.05)
        servers.append((srv, thread))
        return f"http://127.0.0.1:{port}"

    servers = []
    yield start
    for srv, thread in servers:
        srv.should_exit = True
        thread.join(timeout=10)


def test_official_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server(api_key="k") + "/v1", api_key="k")
    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="The quick", max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong").models.list()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_chat_page_streams_a_reply_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url = server()
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page()
        page.goto(url)
        page.fill("#max-tokens", "20")
        page.fill("#input", "Hello there")
        page.press("#input", "Enter")
        replies = "[...document.querySelectorAll('.assistant')].filter(e => e.textContent.length > 0).length"
        page.wait_for_function(f"{replies} === 1", timeout=30_000)
        assert page.inner_text(".user") == "Hello there"
        page.fill("#input", "And again")  # the conversation goes on, history included
        page.press("#input", "Enter")
        page.wait_for_function(f"{replies} === 2", timeout=30_000)
        assert page.locator(".user").all_inner_texts() == ["Hello there", "And again"]
        assert not page.is_visible("#error")
        page.screenshot(path=str(tmp_path / "chat.png"))
        browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_chat_page_shows_errors(server):
    from playwright.sync_api import sync_playwright

    url = server(api_key="secret")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url)
        page.fill("#input", "hi")
        page.press("#input", "Enter")
        page.wait_for_selector("#error", state="visible", timeout=15_000)
        assert "API key" in page.inner_text("#error")
        browser.close()


def test_sigterm_stops_a_server_with_requests_in_flight(tmp_path, bpe):
    import signal
    import subprocess
    import sys

    import httpx

    from gptkit import GPT, checkpoint, preset

    checkpoint.save(tmp_path / "ckpt", GPT(preset("tiny-gpt2", vocab_size=bpe.vocab_size)), bpe)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptkit", "serve", str(tmp_path / "ckpt"), "--port", str(port),
                             "--model-name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        started = threading.Event()

        def stream():
            body = {"model": "tiny", "prompt": "x", "max_tokens": 250, "stream": True, "n": 16}
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                    for _ in r.iter_lines():
                        started.set()
            except httpx.HTTPError:
                pass

        clients = [threading.Thread(target=stream, daemon=True) for _ in range(4)]
        for t in clients:
            t.start()
        assert started.wait(30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        output = proc.communicate()[0]
    assert "Traceback" not in output, output

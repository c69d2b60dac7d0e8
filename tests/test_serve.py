"""``tsedge serve`` on the loopback address with the official ``openai`` client: answers equal
``tsedge generate``'s, concurrent clients queued, bad requests answered, memory flat, client
disconnects cancel, the Selection Cache hit rate in /metrics, the chat page in headless Chromium,
and the server's overhead per request (printed)."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import openai
import psutil
import pytest
from click.testing import CliRunner
from test_chat import tiny_folder, tiny_lib  # noqa: F401 (fixtures: a tiny model, 64-token cache)

from tsedge.cli import main
from tsedge.engine import Engine
from tsedge.sampling import PEER_DEFAULTS, Sampler, SamplingParams, frequency_penalty
from tsedge.serve.stops import StopText

TINY = "tiny-chat-model"  # the tiny folder's name: the served model id
GREEDY = SamplingParams(temperature=0.0, repetition_penalty=PEER_DEFAULTS["repetition_penalty"])  # serve's default


class Served:
    """``tsedge serve ... --port 0`` in a subprocess; ``url`` once it listens, stderr kept."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tsedge.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 600
        while (line := self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))) is not None:
            if found := re.search(r" at (http://\S+) ", line):
                self.url = found.group(1)
                return
        raise RuntimeError(f"tsedge serve exited ({self.proc.wait()}):\n{''.join(self.stderr)}")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kw)

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        """Raw POST (bodies the openai client would never send): status and JSON answer."""
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return response.read().decode()

    def metric(self, name: str) -> float:
        """The value of one sample (``name`` with its labels) of /metrics, 0 if absent."""
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_server(tiny_folder, tiny_lib):
    server = Served("--model", str(tiny_folder), "--lib", str(tiny_lib))
    yield server
    server.close()


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory):
    """The embedded SmolLM2-135M on a TokenSelect library with small budgets (208 tokens: short
    chats stay within them, where it equals dense; longer prompts select)."""
    lib = tmp_path_factory.mktemp("serve") / "smol-tokenselect.so"
    result = CliRunner().invoke(main, ["compile", "--target", "llvm", "--dtype", "float32", "--policy", "tokenselect",
                                       "--n-init", "16", "--n-local", "64", "--select-top-k", "128",
                                       "--chunk-size", "64", "--max-context", "1024", "-o", str(lib)])
    assert result.exit_code == 0, result.output
    server = Served("--lib", str(lib))
    yield server
    server.close()


def chat(client: openai.OpenAI, text: str, stream: bool = False, **kw):
    """(text, finish_reason, usage, timings) of a one-message chat."""
    messages = [{"role": "user", "content": text}]
    model = kw.pop("model", TINY)
    if not stream:
        out = client.chat.completions.create(model=model, messages=messages, **kw)
        return out.choices[0].message.content, out.choices[0].finish_reason, out.usage, out.model_extra["timings"]
    pieces, finish, usage, timings = [], None, None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
            timings = chunk.model_extra.get("timings") or timings
    return "".join(pieces), finish, usage, timings


def generate_cli(folder, lib, prompt: str, *args: str) -> dict:
    result = CliRunner().invoke(main, ["generate", "--model", str(folder), "--lib", str(lib), "--prompt", prompt,
                                       "--temperature", "0", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ---- answers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_chat_answer_equals_tsedge_generate(tiny_server, tiny_folder, tiny_lib, stream):
    expected = generate_cli(tiny_folder, tiny_lib, "Hi there.", "--max-new-tokens", "12")
    text, finish, usage, timings = chat(tiny_server.client(), "Hi there.", stream, temperature=0, max_tokens=12)
    assert text == expected["text"]
    assert finish == {"length": "length", "stop_token": "stop"}[expected["stopped"]]
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected["prompt_tokens"], expected["generated_tokens"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert timings["ttft_ms"] > 0 and timings["decode_tok_per_s"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_tsedge_generate_raw(tiny_server, tiny_folder, tiny_lib, stream):
    expected = generate_cli(tiny_folder, tiny_lib, "The quick brown fox", "--raw", "--max-new-tokens", "9")
    client = tiny_server.client()
    if stream:
        chunks = list(client.completions.create(model=TINY, prompt="The quick brown fox", temperature=0,
                                                max_tokens=9, stream=True))
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        out = client.completions.create(model=TINY, prompt="The quick brown fox", temperature=0, max_tokens=9)
        text, finish = out.choices[0].text, out.choices[0].finish_reason
        assert out.usage.completion_tokens == expected["generated_tokens"]
    assert (text, finish) == (expected["text"], "length")


def test_sampling_fields_reach_the_sampler(tiny_server, tiny_folder, tiny_lib):
    """temperature, top_p, seed, presence and frequency penalties: the engine's seeded draw."""
    fields = {"temperature": 1.3, "top_p": 0.95, "seed": 7, "presence_penalty": 0.4, "frequency_penalty": 1.5}
    engine = Engine(tiny_lib, str(tiny_folder))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Hi there."}])
    result = engine.generate(prompt, 20, SamplingParams(**{**PEER_DEFAULTS, **fields}))
    expected = engine.tokenizer.decode(result.tokens, skip_special_tokens=True)
    client = tiny_server.client()
    assert chat(client, "Hi there.", max_tokens=20, **fields)[0] == expected
    assert chat(client, "Hi there.", True, max_tokens=20, **fields)[0] == expected


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_end_the_text_before_them(tiny_server, stream):
    client = tiny_server.client()
    full = chat(client, "Hi there.", temperature=0, max_tokens=16)[0]
    stop = full[5:7]
    text, finish, usage, _ = chat(client, "Hi there.", stream, temperature=0, max_tokens=16, stop=[stop, "never"])
    assert (text, finish) == (full[:full.index(stop)], "stop")
    assert usage.completion_tokens < 16


def test_stop_text_holds_back_possible_stops():
    stop = StopText(["END", "xyz"])
    assert [stop.push(p) for p in ["ab", "cE", "N", "x", "y"]] == ["ab", "c", "", "EN", ""]
    assert stop.flush() == "xy"
    stop = StopText(["END"])
    assert [stop.push(p) for p in ["aE", "NDb", "more"]] == ["a", "", ""] and stop.hit


def test_frequency_penalty_matches_numpy():
    logits = np.random.default_rng(0).normal(0, 3, 50)
    generated = [5, 5, 5, 9, 30, 9]
    reference = logits.copy()
    for token in generated:  # OpenAI: subtracted once per occurrence
        reference[token] -= 0.7
    np.testing.assert_allclose(frequency_penalty(logits, Counter(generated), 0.7), reference, rtol=1e-15)
    flat = np.zeros(50)
    flat[[4, 6]] = [2.0, 1.5]
    sampler = Sampler(SamplingParams(frequency_penalty=0.3))  # 4 wins until picked twice: 2 - 0.6 < 1.5
    assert [sampler(flat) for _ in range(3)] == [4, 4, 6]


# ---- queueing, reuse, memory --------------------------------------------------------------------
def test_twenty_concurrent_clients_get_their_own_answers(tiny_server, tiny_folder, tiny_lib):
    questions = [f"Question {i}: what is {i} plus {i}?" for i in range(20)]
    engine = Engine(tiny_lib, str(tiny_folder))
    expected = []
    for q in questions:
        result = engine.generate(engine.tokenizer.encode_chat([{"role": "user", "content": q}]), 10, GREEDY)
        expected.append(engine.tokenizer.decode(result.tokens, skip_special_tokens=True))
    before = tiny_server.metric('tsedge_requests_total{endpoint="/v1/chat/completions",outcome="length"}')
    client = openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)

    async def ask(i: int) -> str:
        messages = [{"role": "user", "content": questions[i]}]
        if i % 2:
            out = await client.chat.completions.create(model=TINY, messages=messages, temperature=0, max_tokens=10)
            return out.choices[0].message.content
        stream = await client.chat.completions.create(model=TINY, messages=messages, temperature=0, max_tokens=10,
                                                      stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def everyone() -> list[str]:
        return await asyncio.gather(*(ask(i) for i in range(20)))

    assert asyncio.run(everyone()) == expected
    after = tiny_server.metric('tsedge_requests_total{endpoint="/v1/chat/completions",outcome="length"}')
    assert after - before == 20  # every answer ran to its max_tokens, none dropped


def test_next_turn_reuses_the_cached_prefix(tiny_server):
    client = tiny_server.client()
    messages = [{"role": "user", "content": "Hi there."}]
    first = client.chat.completions.create(model=TINY, messages=messages, temperature=0, max_tokens=4)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model=TINY, messages=messages, temperature=0, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_memory_after_200_requests_within_5_percent_of_after_20(tiny_server):
    client = tiny_server.client()
    process = psutil.Process(tiny_server.proc.pid)
    rss = {}
    for i in range(1, 201):
        chat(client, f"Message {i} of many.", bool(i % 2), temperature=0, max_tokens=8)
        if i in (20, 200):
            rss[i] = process.memory_info().rss
    assert abs(rss[200] - rss[20]) <= 0.05 * rss[20], f"RSS {rss[20] / 2**20:.1f} -> {rss[200] / 2**20:.1f} MiB"


# ---- bad requests -------------------------------------------------------------------------------
GOOD = b'{"model": "%s", "messages": [{"role": "user", "content": "Hi there."}], "max_tokens": 3}' % TINY.encode()
BAD = {
    "malformed JSON": (b'{"model": "%s", "messages": [' % TINY.encode(), 400, "not valid JSON"),
    "not UTF-8": (GOOD.replace(b"Hi there.", b"Hi th\xe9re."), 400, r"not UTF-8 text \(byte 0xe9"),
    "unknown model": (GOOD.replace(TINY.encode(), b"gpt-4o"), 404, "'gpt-4o' is not served here"),
    "empty messages": (b'{"model": "%s", "messages": []}' % TINY.encode(), 400, "messages: the conversation is empty"),
    "max_tokens 0": (GOOD.replace(b'"max_tokens": 3', b'"max_tokens": 0'), 400, "invalid max_tokens"),
    "max_tokens -5": (GOOD.replace(b'"max_tokens": 3', b'"max_tokens": -5'), 400, "invalid max_tokens"),
    "prompt over the context": (GOOD.replace(b"Hi there.", b"fox " * 80), 400,
                                r"the prompt takes \d{3} tokens, more than this model's context of 64 tokens"),
    "no model": (b'{"messages": [{"role": "user", "content": "Hi"}]}', 400, "missing required field model"),
    "tool role": (GOOD.replace(b'"user"', b'"tool"'), 400, "invalid messages.0.role"),
    "n 2": (GOOD.replace(b'"max_tokens": 3', b'"n": 2'), 400, "one choice per request"),
    "temperature 3": (GOOD.replace(b'"max_tokens": 3', b'"temperature": 3'), 400, "invalid temperature"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_gets_its_error_and_the_server_goes_on(tiny_server, case):
    body, status, message = BAD[case]
    got_status, answer = tiny_server.post("/v1/chat/completions", body)
    assert got_status == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert re.search(message, answer["error"]["message"]) and "\n" not in answer["error"]["message"]
    status, answer = tiny_server.post("/v1/chat/completions", GOOD)
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client_raises_its_error_classes(tiny_server):
    client = tiny_server.client()
    with pytest.raises(openai.NotFoundError, match="not served here"):
        chat(client, "Hi", model="gpt-4o")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=TINY, prompt="fox " * 80)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=TINY, prompt=[1, 2, 10**6])
    assert chat(client, "Hi there.", temperature=0, max_tokens=2)[1] == "length"


def test_models_health_and_metrics(tiny_server):
    models = tiny_server.client().models.list().data
    assert [(m.id, m.model_extra["policy"], m.model_extra["max_context"]) for m in models] == [(TINY, "dense", 64)]
    assert json.loads(tiny_server.get("/health"))["status"] == "ok"
    metrics = tiny_server.get("/metrics")
    for name in ("tsedge_requests_total", "tsedge_prompt_tokens_total", "tsedge_generated_tokens_total",
                 "tsedge_time_to_first_token_seconds_bucket", "tsedge_time_per_output_token_seconds_bucket"):
        assert name in metrics
    assert "selection_cache" not in metrics  # a dense library selects nothing
    assert tiny_server.metric("tsedge_cache_corrections_total") == 0  # off by default


def test_cache_correction_option(tiny_folder, tiny_lib):
    """--cache-correction N reaches the engine: a 10-token answer is corrected after 4 and 8 tokens."""
    server = Served("--model", str(tiny_folder), "--lib", str(tiny_lib), "--cache-correction", "4")
    try:
        out = server.client().completions.create(model=TINY, prompt="one two three", max_tokens=10, temperature=0)
        assert out.choices[0].finish_reason == "length", out  # 10 tokens: 9 decode steps
        assert server.metric("tsedge_cache_corrections_total") == 2
    finally:
        server.close()


# ---- a real model: disconnects, Selection Cache, overhead, the page -------------------------------
def test_client_disconnect_cancels_at_the_next_token(smol_server):
    client = smol_server.client()
    cancelled = 'tsedge_requests_total{endpoint="/v1/chat/completions",outcome="cancelled"}'
    generated = smol_server.metric("tsedge_generated_tokens_total")
    stream = client.chat.completions.create(model="smollm2-135m", messages=[
        {"role": "user", "content": "Write a long story about a cat."}], max_tokens=300, stream=True)
    assert any(chunk.choices[0].delta.content for chunk in stream)  # the first token arrived
    stream.close()
    with pytest.raises(openai.APITimeoutError):  # a non-streaming client that gives up
        smol_server.client(timeout=1.0).chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Tell me about dogs."}], max_tokens=300)
    deadline = time.monotonic() + 60
    while smol_server.metric(cancelled) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert smol_server.metric(cancelled) == 2
    # both stopped soon after their client left (the streaming one after a few tokens, the other
    # after its 1 s timeout: ~90 tokens at 2-core CPU speed), far from the 600 they asked for
    assert smol_server.metric("tsedge_generated_tokens_total") - generated < 300


def test_selection_cache_hit_rate_in_metrics(smol_server):
    import pydoc_data.topics

    text = pydoc_data.topics.topics["assignment"][:1500]  # ~350 tokens: beyond the 208-token budget
    out = smol_server.client().completions.create(model="smollm2-135m", prompt=text, max_tokens=24, temperature=0)
    assert out.usage.prompt_tokens > 208
    lookups = smol_server.metric("tsedge_selection_cache_lookups_total")
    hits = smol_server.metric("tsedge_selection_cache_hits_total")
    assert lookups > 0
    assert smol_server.metric("tsedge_selection_cache_hit_rate") == pytest.approx(hits / lookups)


def test_server_overhead_per_request(smol_server, capsys):
    """Time from sending a request to its first streamed token, minus the engine's TTFT."""
    client = smol_server.client()
    overheads, ttfts = [], []
    for i in range(8):
        start = time.perf_counter()
        first = None
        for chunk in client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": f"Say {i}."}], max_tokens=2, stream=True):
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - start
            if chunk.choices and chunk.choices[0].finish_reason:
                ttft = chunk.model_extra["timings"]["ttft_ms"] / 1e3
        overheads.append(first - ttft)
        ttfts.append(ttft)
    median = statistics.median(overheads)
    with capsys.disabled():
        print(f"\nserver overhead per request (request to first streamed token minus engine TTFT): median "
              f"{median * 1e3:.1f} ms, max {max(overheads) * 1e3:.1f} ms over {len(overheads)} requests "
              f"(engine TTFT median {statistics.median(ttfts) * 1e3:.1f} ms)")
    assert median < 0.05


CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--window-size=1100,700"]


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Debian's chromium and its chromedriver (module scope: checked before the server starts)."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip("needs Debian's chromium and its driver: apt-get install chromium chromium-driver")
    return found


def test_chat_page_in_headless_chromium(chromium, smol_server, tmp_path, capsys):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for arg in [*CHROMIUM, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromium[1]))
    question = "What is the capital of France?"
    try:
        driver.get(smol_server.url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "policy tokenselect" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "input").send_keys(question, Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-state=done]"))
        reply = driver.find_element(By.CSS_SELECTOR, ".assistant").text
        stats = driver.find_element(By.CSS_SELECTOR, ".stats").text
        screenshot = tmp_path / "chat-page.png"
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    with capsys.disabled():
        print(f"\nchat page screenshot: {screenshot}")
    expected = chat(smol_server.client(), question, model="smollm2-135m")[0]
    assert reply == expected.strip()  # the page shows the API's greedy answer (innerText drops edge blanks)
    assert "Paris" in reply
    assert re.search(r"tokens · TTFT \d+ ms · prefill [\d.]+ tok/s · decode [\d.]+ tok/s", stats)

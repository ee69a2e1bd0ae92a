"""The OpenAI-compatible server as users meet it: a real `dllm serve` process on 127.0.0.1 (free port) with a
tiny checkpoint, driven by the official `openai` client (raw HTTP for what that client cannot send), checked
against `LLM` offline; plus the in-process app for the failures a live server cannot be pushed into on demand
(503 after shutdown, 500 without a traceback).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from dllm import SamplingParams

API_KEY = "test-key"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "user", "content": "What is 12 * 7?"}]


class ServerProcess:
    """`dllm serve CHECKPOINT --port <free> ARGS...` in a subprocess, its log in a file."""

    def __init__(self, checkpoint, log_path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("dllm")
        cmd = [exe] if exe else [sys.executable, "-m", "dllm.cli"]
        cmd += ["serve", str(checkpoint), "--port", str(self.port), "--served-model-name", MODEL,
                "--device", "cpu", *args]  # the same device and dtype as the offline LLM it is compared with
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env.pop("DLLM_API_KEY", None)
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"dllm serve exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"dllm serve did not become healthy in {timeout_s} s:\n{self.log_path.read_text()}")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=AUTH, timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tiny_llada, tmp_path_factory):
    srv = ServerProcess(tiny_llada, tmp_path_factory.mktemp("server") / "serve.log", "--api-key", API_KEY,
                        "--max-batch-size", "16", "--max-wait-ms", "20", "--cache", "none", "--strategy", "reference")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(llm_factory):
    return llm_factory()  # the server's setting: cache none, strategy reference


def _stream_texts(stream) -> tuple[dict[int, list[str]], dict[int, str], object]:
    """Deltas and finish reason per choice index, and the usage chunk, of a chat or completion stream."""
    deltas, reasons, usage = {}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text = c.delta.content if hasattr(c, "delta") else c.text
            if text:
                deltas.setdefault(c.index, []).append(text)
            if c.finish_reason:
                assert c.index not in reasons, "a choice got two finish reasons"
                reasons[c.index] = c.finish_reason
    return deltas, reasons, usage


# --- the openai client against the server, checked against LLM offline ---

def test_models_lists_the_model(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed


def test_chat_at_temperature_0_matches_llm_chat(client, offline):
    params = SamplingParams(max_tokens=16, block_length=4, temperature=0)
    want = offline.chat(CHAT, params)[0]
    got = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                         extra_body={"block_length": 4, "return_token_ids": True})
    assert got.object == "chat.completion" and got.model == MODEL and len(got.choices) == 1
    choice = got.choices[0]
    assert choice.token_ids == want.token_ids
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completions_at_temperature_0_match_llm_generate(client, offline):
    params = SamplingParams(max_tokens=16, block_length=4, temperature=0)
    prompts = ["The capital of France is", "1, 2, 3,"]
    want = offline.generate(prompts + [[5, 6, 7, 8]], params)
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=16, temperature=0,
                                    extra_body={"block_length": 4, "return_token_ids": True})
    assert [c.token_ids for c in got.choices] == [w.token_ids for w in want[:2]]
    assert [c.text for c in got.choices] == [w.text for w in want[:2]]
    assert got.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want[:2])
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want[:2])
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=16, temperature=0,
                                    extra_body={"block_length": 4, "return_token_ids": True})
    assert ids.choices[0].token_ids == want[2].token_ids


def test_a_request_can_pick_the_remasking_strategy_saber(client, server, tiny_llada):
    """A request names `strategy: saber` (cache none, the server's); its tokens are the offline ones and its
    re-masked tokens show in /metrics."""
    from dllm import LLM
    want = LLM(str(tiny_llada), strategy="saber", cache="none", device="cpu").generate(
        ["1, 2, 3,"], SamplingParams(max_tokens=16, block_length=8, temperature=0))[0]
    before = server.metrics().get("dllm_remasked_tokens_total", 0.0)
    got = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=16, temperature=0,
                                    extra_body={"block_length": 8, "strategy": "saber", "return_token_ids": True})
    assert got.choices[0].token_ids == want.token_ids and want.metrics.num_remasked > 0
    assert server.metrics()["dllm_remasked_tokens_total"] - before == want.metrics.num_remasked


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_joined_equals_non_stream_for_the_same_seed(client, offline, endpoint):
    kw = dict(model=MODEL, max_tokens=16, temperature=0.9, seed=7, n=2, extra_body={"block_length": 4})
    create = client.chat.completions.create if endpoint == "chat" else client.completions.create
    kw.update(messages=CHAT) if endpoint == "chat" else kw.update(prompt="Once upon a time")
    full = create(**kw)
    deltas, reasons, usage = _stream_texts(create(**kw, stream=True, stream_options={"include_usage": True}))
    for c in full.choices:
        text = c.message.content if endpoint == "chat" else c.text
        assert "".join(deltas.get(c.index, [])) == text
        assert reasons[c.index] == c.finish_reason
    assert len(deltas[0]) >= 2, "text should arrive block by block, not in one piece"
    assert usage is not None and usage.model_dump() == full.usage.model_dump()
    if endpoint == "completions":  # choice j decodes with seed + j, as LLM.generate does with that seed
        for j, c in enumerate(full.choices):
            want = offline.generate("Once upon a time", SamplingParams(max_tokens=16, block_length=4,
                                                                       temperature=0.9, seed=7 + j))[0]
            assert c.text == want.text


def test_stop_strings_cut_the_text_the_same_way_streamed_or_not(client):
    base = client.completions.create(model=MODEL, prompt="abc", max_tokens=16, temperature=0,
                                     extra_body={"block_length": 4}).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 2]
    want = base[:base.find(stop)]
    kw = dict(model=MODEL, prompt="abc", max_tokens=16, temperature=0, stop=[stop], extra_body={"block_length": 4})
    got = client.completions.create(**kw).choices[0]
    assert (got.text, got.finish_reason) == (want, "stop")
    deltas, reasons, _ = _stream_texts(client.completions.create(**kw, stream=True))
    assert "".join(deltas.get(0, [])) == want and reasons[0] == "stop"


def test_max_tokens_not_divisible_by_block_length_is_rounded_up_then_cut(client, offline):
    want = offline.generate("hello", SamplingParams(max_tokens=12, block_length=4, temperature=0))[0]
    got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                         max_completion_tokens=10, temperature=0,
                                         extra_body={"block_length": 4, "return_token_ids": True})
    assert len(got.choices[0].token_ids) <= 10 and got.usage.completion_tokens == len(got.choices[0].token_ids)
    got = client.completions.create(model=MODEL, prompt="hello", max_tokens=10, temperature=0,
                                    extra_body={"block_length": 4, "return_token_ids": True})
    cut = want.token_ids[:10]
    assert got.choices[0].token_ids == cut and got.usage.completion_tokens == len(cut)
    if len(want.token_ids) > 10:
        assert got.choices[0].finish_reason == "length"


# --- errors, auth ---

LONG_PROMPT = "x" * 600  # byte-level tokenizer: 600 tokens, over the tiny model's context of 512

ERROR_CASES = [  # (path, body, status, param, code)
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0.5}, 400, "top_p", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "steps": 5, "max_tokens": 16, "block_length": 4}, 400,
     "steps", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "strategy": "beam"}, 400, "strategy", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 3}, 400, "logprobs", "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": [99999]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 600}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT}, 413, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}]}, 413,
     "messages", "context_length_exceeded"),
    ("/v1/nowhere", {}, 404, None, None),
]


@pytest.mark.parametrize("path,body,status,param,code", ERROR_CASES)
def test_errors_have_their_status_and_an_openai_error_body(server, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=content,
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]


def test_the_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=-1)


def test_every_route_but_health_needs_the_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/completions")):
            r = httpx.request(method, f"{server.url}{path}", headers=headers, json={}, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    assert httpx.get(f"{server.url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


# --- load, batching, disconnects ---

def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _one_stream(aclient, i: int) -> dict:
    start = time.perf_counter()
    first = None
    kw = dict(model=MODEL, max_tokens=16, stream=True, stream_options={"include_usage": True},
              temperature=0.5 if i % 4 else 0,  # two batch keys: incompatible requests queue, never refused
              seed=i, extra_body={"block_length": 4})
    if i % 2:
        stream = await aclient.chat.completions.create(messages=[{"role": "user", "content": f"question {i}"}], **kw)
    else:
        stream = await aclient.completions.create(prompt=f"prompt number {i}", **kw)
    reasons, usage = [], None
    async for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            if first is None and (getattr(c, "text", None) or getattr(getattr(c, "delta", None), "content", None)):
                first = time.perf_counter()
            if c.finish_reason:
                reasons.append(c.finish_reason)
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "reasons": reasons,
            "tokens": usage.completion_tokens if usage else None}


async def _load(url: str, num: int) -> tuple[list[dict], float]:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as aclient:
        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(_one_stream(aclient, i) for i in range(num))), 300)
        return results, time.perf_counter() - start


def test_64_concurrent_streams_complete_and_are_batched(server, tmp_path):
    before = server.metrics()
    results, wall = asyncio.run(_load(server.url, 64))
    after = server.metrics()
    assert all(len(r["reasons"]) == 1 and r["reasons"][0] in ("stop", "length") for r in results)
    assert all(r["tokens"] is not None and 1 <= r["tokens"] <= 16 for r in results)
    batches = after["dllm_batches_total"] - before.get("dllm_batches_total", 0)
    assert after["dllm_batch_size_max"] > 1, "no two requests were decoded together"
    assert batches < 64, "every request ran alone"
    latencies = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    figures = {"requests": 64, "max_tokens": 16, "block_length": 4, "wall_s": round(wall, 3),
               "p50_latency_s": round(statistics.median(latencies), 3),
               "p95_latency_s": round(_percentile(latencies, 0.95), 3),
               "p50_ttft_s": round(statistics.median(r["ttft"] for r in results), 3),
               "throughput_tokens_per_s": round(tokens / wall, 1), "throughput_requests_per_s": round(64 / wall, 1),
               "batches": int(batches), "max_batch_size": int(after["dllm_batch_size_max"])}
    (tmp_path / "load_test.json").write_text(json.dumps(figures, indent=1))
    print(f"\nload test ({tmp_path / 'load_test.json'}): {json.dumps(figures)}")


def _cancelled(server) -> float:
    return server.metrics().get('dllm_requests_finished_total{finish_reason="cancelled"}', 0.0)


def _wait_for(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_disconnecting_client_frees_its_slot_and_does_not_stall_others(server, client):
    long = {"model": MODEL, "messages": CHAT, "max_tokens": 448, "block_length": 8, "ignore_eos": True, "stream": True}
    cancelled = _cancelled(server)
    others: list = []
    worker = threading.Thread(target=lambda: others.extend(
        client.completions.create(model=MODEL, prompt=f"other {i}", max_tokens=16, extra_body={"block_length": 4})
        for i in range(4)))
    with httpx.Client(timeout=60, headers=AUTH) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=long) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # (keep the iterator: dropping it closes the connection)
            next(lines)  # the role chunk: the request is queued or running
            assert _wait_for(lambda: server.metrics()["dllm_num_requests_running"] >= 1)
            worker.start()
    # hung up: the request is dropped at the next step of its batch, long before its 448 forwards are done
    assert _wait_for(lambda: _cancelled(server) > cancelled), "the disconnected stream was not cancelled"
    worker.join(timeout=120)
    assert len(others) == 4 and all(c.choices[0].finish_reason for c in others)
    # a non-streamed request whose client gives up is cancelled too
    cancelled = _cancelled(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=0.5,
                   json={"model": MODEL, "prompt": "a long one", "max_tokens": 480, "block_length": 8,
                         "ignore_eos": True, "cfg_scale": 1.0})
    assert _wait_for(lambda: _cancelled(server) > cancelled), "the abandoned request was not cancelled"
    assert _wait_for(lambda: server.metrics()["dllm_num_requests_running"] == 0)
    assert client.completions.create(model=MODEL, prompt="still there?", max_tokens=8).choices[0].finish_reason


# --- queue limits and shutdown (a second, deliberately small server) ---

def test_queue_full_is_429_and_shutdown_finishes_in_flight_streams(tiny_llada, tmp_path):
    srv = ServerProcess(tiny_llada, tmp_path / "small.log", "--max-batch-size", "1", "--max-queue-size", "2")
    try:
        body = {"model": MODEL, "prompt": "busy", "max_tokens": 64, "block_length": 64}

        async def burst():
            async with httpx.AsyncClient(timeout=120) as http:
                return await asyncio.gather(*(http.post(f"{srv.url}/v1/completions", json=body) for _ in range(8)))

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429).json()["error"]
        assert refused["code"] == "queue_full" and refused["type"] == "rate_limit_error"
        too_many = httpx.post(f"{srv.url}/v1/completions", json={**body, "n": 3}, timeout=60)
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"

        with httpx.stream("POST", f"{srv.url}/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": "finish me", "max_tokens": 256, "block_length": 8,
                                "ignore_eos": True, "stream": True}) as r:
            assert _wait_for(lambda: srv.metrics()["dllm_num_requests_running"] >= 1)
            srv.proc.send_signal(signal.SIGTERM)  # graceful shutdown with this stream in flight
            lines = [line for line in r.iter_lines() if line]
        data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert lines[-1] == "data: [DONE]" and data[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert srv.proc.wait(timeout=60) == 0  # a drained shutdown exits 0 (uvicorn would re-raise the signal)
        assert "Application shutdown complete" in srv.log_path.read_text()
    finally:
        srv.stop()


# --- in-process app: states a live server is not pushed into on demand ---

def _asgi(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test", timeout=60)


def test_503_once_the_engine_client_is_shut_down(llm_factory):
    from dllm.server.app import build_app
    from dllm.server.engine_client import EngineClient

    async def go():
        client = EngineClient(llm_factory())
        app = build_app(client, [MODEL])
        await client.start()
        async with _asgi(app) as http:
            ok = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8})
            await client.shutdown()
            return ok, await http.post("/v1/completions", json={"prompt": "hi"}), await http.get("/health")

    ok, refused, health = asyncio.run(go())
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    assert health.status_code == 503


def _step_log(client) -> list:
    """Wrap the client's scheduler step: (steps so far, request ids admitted at it, request ids running after)."""
    log, real_step = [], client.scheduler.step

    def step():
        events = real_step()
        s = client.scheduler
        log.append((s.num_steps, [r.request_id for c in s.admitted for r in c],
                    sorted(rid for c in s.cohorts for rid in c.open)))
        return events

    client.scheduler.step = step
    return log


def test_a_batch_whose_requests_are_all_cancelled_stops_at_its_next_step(llm_factory):
    from dllm.engine import Request
    from dllm.server.engine_client import EngineClient

    llm = llm_factory()
    seen = []

    async def go():
        client = EngineClient(llm, max_wait_ms=0)
        await client.start()
        params = llm.engine.resolve(SamplingParams(max_tokens=256, block_length=8, ignore_eos=True))
        handle = client.submit([(llm.engine, Request("long", llm.tokenizer.encode("hi"), params))])
        async for _ in handle:  # the first final text: the batch is running
            seen.append(client.scheduler.num_steps)
            handle.cancel()
        while client.num_running:
            await asyncio.sleep(0.01)
        seen.append(client.scheduler.num_steps)
        await client.shutdown()

    asyncio.run(go())
    first, last = seen
    assert last <= first + 2, f"the cancelled request went on for {last - first} steps after its cancel"


def test_a_request_sent_while_another_decodes_starts_and_ends_before_it(llm_factory):
    """Continuous batching: a short request that arrives while a long one decodes joins at the next step and
    finishes long before the long one (timestamps of their events); the long one's tokens are its own."""
    from dllm.engine import Request
    from dllm.server.engine_client import EngineClient

    llm = llm_factory()
    times: dict[str, list[float]] = {"long": [], "short": []}
    outputs = {}

    async def read(handle, name):
        async for event in handle:
            times[name].append(time.perf_counter())
            if event.output is not None:
                outputs[name] = event.output

    async def go():
        client = EngineClient(llm, max_wait_ms=0)
        log = _step_log(client)
        await client.start()
        long = llm.engine.resolve(SamplingParams(max_tokens=256, block_length=8, ignore_eos=True, seed=0))
        short = llm.engine.resolve(SamplingParams(max_tokens=8, block_length=8, ignore_eos=True, seed=0))
        first = asyncio.ensure_future(read(client.submit(
            [(llm.engine, Request("long", llm.tokenizer.encode("a long story"), long))]), "long"))
        while not times["long"]:                       # the long request is decoding
            await asyncio.sleep(0.001)
        sent, sent_step = time.perf_counter(), client.scheduler.num_steps
        second = asyncio.ensure_future(read(client.submit(
            [(llm.engine, Request("short", llm.tokenizer.encode("hi"), short))]), "short"))
        await asyncio.gather(first, second)
        await client.shutdown()
        return sent, sent_step, log

    sent, sent_step, log = asyncio.run(go())
    admitted = next(step for step, ids, _ in log if "short" in ids)
    assert admitted <= sent_step + 2, "the short request waited for more than the step in flight"
    assert any("long" in running and "short" in running for _, _, running in log)   # decoded side by side
    assert sent < times["short"][0] < times["short"][-1] < times["long"][-1]
    assert times["short"][-1] - sent < (times["long"][-1] - times["long"][0]) / 4
    alone = llm.generate([llm.tokenizer.encode("a long story")],
                         SamplingParams(max_tokens=256, block_length=8, ignore_eos=True, seed=0))[0]
    assert outputs["long"].outputs[0].token_ids == alone.outputs[0].token_ids


def test_a_cancelled_request_frees_its_slot_at_the_next_step(llm_factory):
    from dllm.engine import Request
    from dllm.server.engine_client import EngineClient

    llm = llm_factory()

    async def go():
        client = EngineClient(llm, max_batch_size=1, max_wait_ms=0)
        log = _step_log(client)
        await client.start()
        params = llm.engine.resolve(SamplingParams(max_tokens=256, block_length=8, ignore_eos=True))
        first = client.submit([(llm.engine, Request("first", llm.tokenizer.encode("hi"), params))])
        while client.num_running < 1:
            await asyncio.sleep(0.001)
        second = client.submit([(llm.engine, Request("second", llm.tokenizer.encode("ho"), params))])
        while client.num_waiting < 1 or client.scheduler.num_waiting < 1:   # in the scheduler, no free slot
            await asyncio.sleep(0.001)
        metrics = client.metrics.render()
        assert "dllm_slots_in_use 1" in metrics and "dllm_slot_utilization 1" in metrics
        cancelled_at = client.scheduler.num_steps
        first.cancel()
        async for _ in second:    # the second decodes, in the freed slot
            break
        second.cancel()
        while client.num_running:
            await asyncio.sleep(0.01)
        await client.shutdown()
        return cancelled_at, log

    cancelled_at, log = asyncio.run(go())
    admitted = next(step for step, ids, _ in log if "second" in ids)
    assert admitted <= cancelled_at + 2
    assert all(len(running) <= 1 for _, _, running in log)   # one slot: never two rows at once


def test_bugs_answer_500_with_an_openai_body_and_no_traceback(llm_factory, monkeypatch):
    from dllm.server import serving_common
    from dllm.server.app import build_app
    from dllm.server.engine_client import EngineClient

    async def go():
        client = EngineClient(llm_factory())
        app = build_app(client, [MODEL])
        await client.start()
        async with _asgi(app) as http:
            with monkeypatch.context() as m:  # a failure inside decoding
                m.setattr(client.llm.engine, "open_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
                in_engine = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8})
            with monkeypatch.context() as m:  # a bug in the serving layer
                m.setattr(serving_common.OpenAIServing, "prepare", lambda *a: {}["missing"])
                in_server = await http.post("/v1/chat/completions", json={"messages": CHAT})
            after = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8})
        await client.shutdown()
        return in_engine, in_server, after

    in_engine, in_server, after = asyncio.run(go())
    for r in (in_engine, in_server):
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in r.text
    assert "boom" in in_engine.json()["error"]["message"]
    assert after.status_code == 200, "the server keeps serving after a failed batch"


# --- the CLI hook ---

def test_serve_is_a_dllm_subcommand_that_loads_fastapi_only_when_run(tiny_llada):
    script = ("import sys; from dllm.cli import build_parser, main; build_parser(); "
              "assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules; "
              "sys.modules['fastapi'] = None; sys.exit(main(['serve', sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", script, str(tiny_llada)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: dllm serve needs the server extra: pip install 'dllm[server]'"
    r = subprocess.run([sys.executable, "-m", "dllm.cli", "serve", str(tiny_llada), "--port", "70000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --port") and len(r.stderr.splitlines()) == 1

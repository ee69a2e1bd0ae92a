"""The server against hostile input: every field with wrong types and extreme values, invalid Unicode, forged
log lines, a faulty request inside a batch, and a SIGTERM past --shutdown-timeout.

Most cases run against one in-process uvicorn server (a real socket, uvicorn's HTTP and JSON parsing, the
real app) in a background thread; the shutdown cases need a `dllm serve` process to signal.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import socket
import threading
import time

import httpx
import pytest

from checkpoints import break_after
from dllm import SamplingParams
from dllm.errors import InvalidParameterError
from dllm.sampling_params import MAX_SEED
from test_server import ServerProcess, _wait_for

MODEL = "tiny"
CHAT = [{"role": "user", "content": "hi"}]
BASE = {"/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 8, "block_length": 4},
        "/v1/chat/completions": {"model": MODEL, "messages": CHAT, "max_tokens": 8, "block_length": 4}}


class InThreadServer:
    def __init__(self, llm, **client_kw):
        import uvicorn

        from dllm.server.app import build_app
        from dllm.server.engine_client import EngineClient

        self.client = EngineClient(llm, **client_kw)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(build_app(self.client, [MODEL]), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert _wait_for(lambda: self.server.started, 60), "the in-thread server did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def llm(llm_factory):
    return llm_factory()


@pytest.fixture(scope="module")
def srv(llm):
    server = InThreadServer(llm, max_batch_size=8, max_wait_ms=200)
    yield server
    server.stop()


def post(srv, path: str, body, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN/Infinity as JSON5-ish literals
    return httpx.post(f"{srv.url}{path}", content=content, headers={"Content-Type": "application/json"},
                      timeout=timeout)


def assert_openai_error(r: httpx.Response, status: int | None, param: str | None) -> dict:
    assert r.status_code < 500, r.text
    if status is not None:
        assert r.status_code == status, r.text
    else:
        assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and "\n" not in error["message"] and "\r" not in error["message"], error
    assert "Traceback" not in error["message"]
    assert error["param"] == param, error
    return error


# --- wrong types for every field, and the values that used to pass ---

INT_FIELDS = ("max_tokens", "n", "seed", "steps", "block_length", "top_k")
NUMBER_FIELDS = ("temperature", "top_p", "threshold", "factor", "alg_temp", "eps", "entropy_bound", "cfg_scale")
BOOL_FIELDS = ("stream", "logits_eos_inf", "confidence_eos_eot_inf", "ignore_eos", "skip_special_tokens",
               "return_token_ids")
TEXT_FIELDS = ("model", "user", "remasking", "alg", "strategy", "cache", "stop")
BAD_INTS = (True, False, "3", 2.5, [1], {"a": 1}, 4.0)
BAD_NUMBERS = (True, "0.5", [0.5], float("nan"), float("inf"), float("-inf"))
BAD_BOOLS = ("yes", "true", 1, 0, [True], None)
BAD_TEXTS = (5, True, 1.5, "\ud800")


def _type_cases():
    for path in BASE:
        for field, bads in ((f, BAD_INTS) for f in INT_FIELDS):
            for bad in bads:
                yield path, field, bad
        for field in NUMBER_FIELDS:
            for bad in BAD_NUMBERS:
                yield path, field, bad
        for field in BOOL_FIELDS:
            for bad in BAD_BOOLS:
                yield path, field, bad
        for field in TEXT_FIELDS:
            for bad in BAD_TEXTS:
                yield path, field, bad
        for bad in ("x", [True], [1.5], ["1"], [-1], [10**12], 7):
            yield path, "stop_token_ids", bad
        for bad in ({"include_usage": "yes"}, {"include_usage": 1}, "yes", [True]):
            yield path, "stream_options", bad
    for bad in BAD_INTS:
        yield "/v1/chat/completions", "max_completion_tokens", bad
    for bad in ("\ud800", 5, [1, "a"], [[1, True]], [True], [], [[]], ["ok", "\udfff"], [10**12], [-1], {"a": 1}):
        yield "/v1/completions", "prompt", bad
    for bad in ("hi", [], [{"role": "user"}, 5], [{"role": 5, "content": "x"}],
                [{"role": "user", "content": "\ud800"}], [{"role": "user\ud800", "content": "x"}],
                [{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                [{"role": "user", "content": 7}], [{"role": "user", "content": "x", "name": "\ud800"}]):
        yield "/v1/chat/completions", "messages", bad


TYPE_CASES = list(_type_cases())


def test_wrong_types_and_invalid_text_in_every_field_are_400_naming_the_field(srv):
    """Several hundred bodies, each with one bad field; answered concurrently (a slow or failing one would show)."""
    assert len(TYPE_CASES) > 300

    async def go():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as http:
            return await asyncio.gather(*(
                http.post(f"{srv.url}{path}", headers={"Content-Type": "application/json"},
                          content=json.dumps({**BASE[path], field: bad}).encode())
                for path, field, bad in TYPE_CASES))

    for (path, field, bad), r in zip(TYPE_CASES, asyncio.run(go())):
        error = assert_openai_error(r, 400, field)
        if isinstance(bad, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in bad):
            assert "Unicode" in error["message"], (field, error)


# (body overrides, param): the values of the issue that used to be accepted or crashed
VALUE_CASES = [
    ({"seed": 2**70}, "seed"), ({"seed": -1}, "seed"), ({"seed": MAX_SEED + 1}, "seed"),
    ({"steps": 10**9}, "steps"), ({"steps": 9, "max_tokens": 8, "block_length": 8}, "steps"),
    ({"max_tokens": 10**9}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2**70}, "max_tokens"),
    ({"n": 10**9}, "n"), ({"n": 0}, "n"),
    ({"temperature": 1e308}, "temperature"), ({"temperature": 1e-300}, "temperature"), ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"stop_token_ids": [10**12]}, "stop_token_ids"), ({"stop_token_ids": [0] * 5000}, "stop_token_ids"),
    ({"cfg_scale": 1e9}, "cfg_scale"), ({"cfg_scale": -1}, "cfg_scale"),
    ({"threshold": 0}, "threshold"), ({"threshold": 2}, "threshold"), ({"factor": 1e300}, "factor"),
    ({"block_length": 10**9}, "max_tokens"), ({"top_k": -2}, "top_k"),
    ({"remasking": "nope\nINFO forged"}, "remasking"), ({"strategy": "beam\r\nx"}, "strategy"),
    ({"cache": "\x00"}, "cache"), ({"stop": [""]}, "stop"), ({"logprobs": True}, "logprobs"),
    ({"stop": [str(i) for i in 100000 * [1]]}, "stop"), ({"stop": "x" * 100000}, "stop"),
]


@pytest.mark.parametrize("path", list(BASE))
def test_extreme_values_are_400_within_a_second(srv, path):
    for overrides, param in VALUE_CASES:
        start = time.perf_counter()
        r = post(srv, path, {**BASE[path], **overrides})
        elapsed = time.perf_counter() - start
        assert_openai_error(r, 400, param)
        assert elapsed < 1.0, (overrides, elapsed)


def test_raw_bodies_are_400(srv):
    for raw in (b"", b"{", b"[]", b"null", b"123", b'"x"', b"\xff\xfe{}", b'{"prompt": "\xff"}',
                b'{"model": "tiny", "prompt": "a", "temperature": NaN}', b'{"prompt": "a", "max_tokens": 1e400}',
                b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", b'{"prompt": "a\\ud800"}',
                b'{"prompt": "a\\udc00\\ud800", "model": "tiny"}', b"{" * 10000, b"[" * 100000 + b"]" * 100000):
        r = post(srv, "/v1/completions", raw)
        assert r.status_code == 400, (raw[:40], r.text)
        assert_openai_error(r, 400, r.json()["error"]["param"])


def test_unknown_field_names_are_escaped_in_the_log(srv, caplog):
    forged = "x\nERROR dllm.server: forged line\r"
    with caplog.at_level(logging.WARNING, logger="dllm.server"):
        r = post(srv, "/v1/completions", {**BASE["/v1/completions"], forged: 1})
    assert r.status_code == 200, r.text
    assert_openai_error(post(srv, "/v1/completions", {**BASE["/v1/completions"], "\ud800": 2}), 400, "body")
    lines = [rec.getMessage() for rec in caplog.records if "unknown request fields" in rec.getMessage()]
    assert lines and all("\n" not in line and "\r" not in line for line in lines), lines
    assert repr(forged) in lines[-1]


def test_a_not_found_path_with_a_newline_gets_a_one_line_error(srv):
    r = httpx.get(f"{srv.url}/v1/x%0Ay%0D%00", timeout=10)
    assert_openai_error(r, 404, None)


# --- a bad request never fails its neighbours ---

def _good(i: int) -> dict:
    return {"model": MODEL, "prompt": f"neighbour {i}", "max_tokens": 8, "block_length": 4, "temperature": 0.8,
            "seed": 100 + i, "return_token_ids": True}


async def _concurrent(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as http:
        return await asyncio.gather(*(http.post(f"{url}/v1/completions", content=json.dumps(b).encode(),
                                                headers={"Content-Type": "application/json"}) for b in bodies))


def test_invalid_requests_sent_with_valid_ones_do_not_fail_them(srv, llm):
    bad = [{**_good(0), "seed": 2**70}, {**_good(1), "prompt": "a\ud800"}, {**_good(2), "steps": 10**9},
           {**_good(3), "temperature": float("nan")}, {**_good(4), "stop_token_ids": [10**12]}]
    good = [_good(i) for i in range(10, 14)]
    responses = asyncio.run(_concurrent(srv.url, bad + good))
    for r in responses[:len(bad)]:
        assert_openai_error(r, 400, r.json()["error"]["param"])
    for body, r in zip(good, responses[len(bad):]):
        assert r.status_code == 200, r.text
        want = llm.generate(body["prompt"], SamplingParams(max_tokens=8, block_length=4, temperature=0.8,
                                                           seed=body["seed"]))[0]
        assert r.json()["choices"][0]["token_ids"] == want.token_ids


def test_a_batch_that_fails_is_retried_one_request_at_a_time(srv, llm, monkeypatch):
    """A request that passes validation but breaks decoding (simulated: the engine raises, mid-batch, whenever
    the poisoned prompt is in the batch) fails alone; its neighbours get exactly their own tokens, streamed or not."""
    poison = llm.tokenizer.encode("poison!", add_special_tokens=False)
    real_open = llm.engine.open_run

    calls = []

    def open_run(requests, stream=True, pool_rows=0):
        run = real_open(requests, stream, pool_rows)
        bad = any(r.prompt_token_ids[-len(poison):] == poison for r in requests)
        calls.append((len(requests), bad))
        if bad:   # after some events were already streamed to the neighbours
            break_after(run, 2, "poisoned\nsecond line")
        return run

    monkeypatch.setattr(llm.engine, "open_run", open_run)
    good = [_good(i) for i in range(20, 24)]
    bodies = good[:2] + [{**_good(99), "prompt": "poison!"}] + good[2:]
    streamed_body = {**_good(30), "stream": True}

    async def go():
        async with httpx.AsyncClient(timeout=120) as http:
            async def stream():
                async with http.stream("POST", f"{srv.url}/v1/completions", json=streamed_body) as r:
                    return [line async for line in r.aiter_lines() if line]
            return await asyncio.gather(*(http.post(f"{srv.url}/v1/completions", json=b) for b in bodies), stream())

    *responses, lines = asyncio.run(go())
    monkeypatch.setattr(llm.engine, "open_run", real_open)
    failed = responses[2]
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error"
    assert "\n" not in failed.json()["error"]["message"]
    for body, r in zip(good, responses[:2] + responses[3:]):
        assert r.status_code == 200, r.text
        want = llm.generate(body["prompt"], SamplingParams(max_tokens=8, block_length=4, temperature=0.8,
                                                           seed=body["seed"]))[0]
        assert r.json()["choices"][0]["token_ids"] == want.token_ids
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1] if line.startswith("data: {")
                   and json.loads(line[6:])["choices"])
    want = llm.generate(streamed_body["prompt"], SamplingParams(max_tokens=8, block_length=4, temperature=0.8,
                                                                seed=streamed_body["seed"]))[0]
    assert text == want.text
    poisoned_batches = [size for size, bad in calls if bad]
    assert max(poisoned_batches) > 1 and poisoned_batches[-1] == 1, calls  # batched, then retried alone
    assert sum(1 for size, bad in calls if size == 1 and not bad) >= len(good), calls


def test_max_num_batched_tokens_splits_batches_and_refuses_oversized_requests(llm):
    srv = InThreadServer(llm, max_batch_size=8, max_wait_ms=100, max_num_batched_tokens=60, max_model_len=40)
    try:
        over = post(srv, "/v1/completions", {**BASE["/v1/completions"], "max_tokens": 36})
        assert_openai_error(over, 400, "max_tokens")
        assert "--max-model-len" in over.json()["error"]["message"]
        cfg = post(srv, "/v1/completions", {**BASE["/v1/completions"], "max_tokens": 32, "cfg_scale": 1.0})
        assert "--max-num-batched-tokens" in assert_openai_error(cfg, 400, "max_tokens")["message"]
        models = httpx.get(f"{srv.url}/v1/models", timeout=10).json()
        assert models["data"][0]["max_model_len"] == 40
        sizes = []
        real_open = llm.engine.open_run
        llm.engine.open_run = lambda requests, *a, **k: (sizes.append(len(requests)), real_open(requests, *a, **k))[1]
        try:  # each request takes 6 + 16 = 22 columns: at most 2 decode at once in 60
            responses = asyncio.run(_concurrent(srv.url, [{**_good(i), "prompt": "abcde", "max_tokens": 16}
                                                          for i in range(5)]))
        finally:
            del llm.engine.open_run
        assert all(r.status_code == 200 for r in responses)
        assert max(sizes) == 2 and sum(sizes) == 5, sizes
    finally:
        srv.stop()


# --- the same validation for API users ---

@pytest.mark.parametrize("kw", [
    {"seed": 2**70}, {"seed": -1}, {"seed": True}, {"max_tokens": True}, {"max_tokens": 2.0}, {"steps": "3"},
    {"temperature": math.nan}, {"temperature": math.inf}, {"temperature": 1e308}, {"temperature": 1e-300},
    {"top_p": math.nan}, {"cfg_scale": 1e9}, {"cfg_scale": math.inf}, {"threshold": math.nan},
    {"factor": math.inf}, {"eps": 1.0}, {"alg_temp": 1e-300}, {"entropy_bound": math.nan},
    {"stop_token_ids": [True]}, {"stop_token_ids": [2**40]}, {"stop_token_ids": "12"},
    {"ignore_eos": "yes"}, {"logits_eos_inf": 1}, {"skip_special_tokens": None}, {"top_k": True},
])
def test_sampling_params_refuses_what_the_server_refuses(kw):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kw)
    assert str(info.value).startswith(next(iter(kw))) and "\n" not in str(info.value)


def test_llm_checks_steps_vocabulary_and_text(llm):
    for params in (SamplingParams(max_tokens=8, steps=10**9), SamplingParams(max_tokens=8, stop_token_ids=[10**6])):
        start = time.perf_counter()
        with pytest.raises(InvalidParameterError, match="steps|stop_token_ids"):
            llm.generate("hello", params)
        assert time.perf_counter() - start < 1.0
    with pytest.raises(InvalidParameterError, match="prompt is not valid Unicode"):
        llm.generate("a\ud800", SamplingParams(max_tokens=8))
    with pytest.raises(InvalidParameterError, match="messages content is not valid Unicode"):
        llm.chat([{"role": "user", "content": "\udc00"}], SamplingParams(max_tokens=8))
    assert SamplingParams(seed=MAX_SEED, temperature=0.01).seed == MAX_SEED


# --- shutdown past --shutdown-timeout ---

def test_sigterm_past_the_shutdown_timeout_answers_503_and_ends_streams_then_exits_0(tiny_llada, tmp_path):
    srv = ServerProcess(tiny_llada, tmp_path / "shutdown.log", "--shutdown-timeout", "1", "--max-batch-size", "1",
                        "--cache", "none", "--strategy", "reference")
    try:
        long = {"model": MODEL, "prompt": "take your time", "max_tokens": 480, "block_length": 8, "ignore_eos": True,
                "cfg_scale": 1.0}
        results: dict = {}

        def plain():
            results["plain"] = httpx.post(f"{srv.url}/v1/completions", json=long, timeout=60)

        def streamed():
            with httpx.stream("POST", f"{srv.url}/v1/completions", json={**long, "stream": True}, timeout=60) as r:
                results["stream"] = [line for line in r.iter_lines() if line]

        threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
        for t in threads:
            t.start()
        assert _wait_for(lambda: srv.metrics()["dllm_num_requests_running"] >= 1
                         and srv.metrics()["dllm_num_requests_waiting"] >= 1)
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert srv.proc.wait(timeout=30) == 0
        print(f"\nexited {time.monotonic() - start:.1f} s after SIGTERM")
        assert time.monotonic() - start < 15
        plain_r = results["plain"]
        assert plain_r.status_code == 503, plain_r.text
        assert plain_r.json()["error"]["code"] == "server_shutting_down"
        assert set(plain_r.json()["error"]) == {"message", "type", "param", "code"}
        lines = results["stream"]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert json.loads(lines[-2][6:])["error"]["code"] == "server_shutting_down", lines[-3:]
    finally:
        srv.stop()


def test_engines_for_other_caches_and_strategies_share_the_server_s_runner(llm):
    # one K/V pool, one set of graphs and the server's --enforce-eager for every engine the server builds
    from dllm.server.engine_client import EngineClient

    client = EngineClient(llm)
    assert client.engine("prefix", "threshold").runner is llm.engine.runner


def test_an_abort_ends_a_reader_with_the_error_even_behind_an_event_it_has_not_read(llm):
    # a reader that lags behind its request's events must still get the 503 when the server aborts: abort_all
    # marks the request cancelled before it queues the error, and the earlier event must not end the loop quietly
    from dllm.engine import Request
    from dllm.server.engine_client import EngineClient
    from dllm.server.errors import ServerClosingError

    async def scenario():
        client = EngineClient(llm, max_batch_size=1, max_wait_ms=0)
        await client.start()
        engine = client.engine("none", "reference")
        params = engine.resolve(SamplingParams(max_tokens=256, block_length=8, ignore_eos=True, seed=0))
        handle = client.submit([(engine, Request("r0", [5, 6, 7], params, None))])
        for _ in range(600):
            if handle._queue.qsize() >= 1:
                break
            await asyncio.sleep(0.01)
        assert handle._queue.qsize() >= 1, "no event reached the handle"
        client.abort_all()
        received = []
        with pytest.raises(ServerClosingError):
            async for event in handle:
                received.append(event)
        assert received == []   # the queued event belongs to a request the server has aborted
        await client.shutdown()

    asyncio.run(scenario())


def test_a_chat_template_that_refuses_the_messages_is_a_400(srv, llm, monkeypatch):
    import jinja2

    def refuse(*args, **kwargs):
        raise jinja2.TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(llm.tokenizer, "apply_chat_template", refuse)
    r = post(srv, "/v1/chat/completions", BASE["/v1/chat/completions"])
    assert "roles must alternate" in assert_openai_error(r, 400, "messages")["message"]

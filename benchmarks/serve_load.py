"""Open-loop load on `dllm serve` through the official `openai` client: Poisson arrivals at several rates.

Every request streams (`stream_options.include_usage`); requests are sent at Poisson times whatever the server
does (open loop), at most `--max-concurrency` in flight (later arrivals wait on the client for a free one, as
vLLM's benchmark_serving does; their clock starts when they are sent). Prompts: the zoo tasks (arith, gsm-lite,
code-lite) through the chat endpoint, GSM8K questions from `--gsm8k` (default ../shared/data/gsm8k/ when it
exists), or `--token-prompts N` (random token ids of length N through /v1/completions, for a server without a
tokenizer, such as `--load-format dummy --skip-tokenizer-init`; it then streams no text, so TTFT is the time to
the final chunk). Settings are mixed per request: max_tokens drawn from `--max-tokens`, and with `--mixed` a third
of the requests sample (temperature 0.7, seeded) and the rest are greedy.

Per rate it prints: throughput (generated tokens, `usage.completion_tokens`, summed / time from the first send to
the last finish; and requests/s), TTFT (send to the first chunk with text, or the final one), time between
streamed chunks (per request, gaps between consecutive chunks with text), latency (send to the end of the stream)
p50/p95/p99, and errors. The last line is one JSON object; it is also written to $OUT/serve_load.json when OUT is
set.

The server: `--url` of a running one, or `--serve MODEL` to start `dllm serve MODEL` here on a free port (with
`--serve-arg` options passed through, e.g. `--serve-arg=--load-format --serve-arg=dummy`, and `--python` to run
another checkout's interpreter, such as the static-batching server before the step scheduler), stopped at the end.

    python benchmarks/serve_load.py --serve tiny-llada --serve-arg=--device --serve-arg=cpu --rates 2,4,8,16
    # the GPU run (LLaDA-8B's shape, random weights, 32 streams at once, answers of 256 tokens in blocks of 32,
    # dual cache, one token a step, as benchmarks/step_time.py's batch-32 row):
    python benchmarks/serve_load.py --serve tests/data/checkpoints/LLaDA-8B-Instruct --token-prompts 64 \\
        --serve-arg=--load-format --serve-arg=dummy --serve-arg=--skip-tokenizer-init --serve-arg=--dtype \\
        --serve-arg=bfloat16 --serve-arg=--device --serve-arg=cuda --serve-arg=--cache --serve-arg=dual \\
        --serve-arg=--strategy --serve-arg=reference --rates inf --requests 96 --max-concurrency 32 \\
        --max-tokens 256 --block-length 32 --ignore-eos --no-mixed
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


# ---------------------------------------------------------------------- prompts

def zoo_messages(n: int, seed: int) -> list[list[dict]]:
    from dllm.eval.tasks import get_task, to_messages
    problems = [p for name in ("arith", "gsm-lite", "code-lite") for p in get_task(name).generate("test", n)]
    random.Random(seed).shuffle(problems)
    return [to_messages(p) for p in problems[:n]]


def gsm8k_messages(path: Path, n: int, seed: int) -> list[list[dict]]:
    file = path / "test.jsonl" if path.is_dir() else path
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return [[{"role": "user", "content": r["question"]}] for r in rows[:n]]


def default_gsm8k() -> Path | None:
    path = REPO.parent / "shared" / "data" / "gsm8k"
    return path if (path / "test.jsonl").is_file() else None


# ---------------------------------------------------------------------- the server

class Server:
    """`dllm serve MODEL --port <free>` in a subprocess (its log in a temporary file)."""

    def __init__(self, model: str, args: list[str], python: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="dllm-serve-", suffix=".log", delete=False)
        if Path(model).exists():
            model = str(Path(model).resolve())
        cmd = [python, "-m", "dllm.cli", "serve", model, "--port", str(self.port), "--log-level", "warning", *args]
        print("starting:", " ".join(cmd), f"(log {self.log.name})", flush=True)
        # (not run from a checkout's root, whose dllm/ would shadow the interpreter's installed one)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 1800.0) -> None:
        import httpx
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"dllm serve exited with {self.proc.returncode}:\n{Path(self.log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        sys.exit("dllm serve did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def scrape(url: str) -> dict[str, float]:
    import httpx
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


# ---------------------------------------------------------------------- one request

async def one(client, model: str, job: dict, args) -> dict:
    extra = {"block_length": args.block_length}
    if args.ignore_eos:
        extra["ignore_eos"] = True
    if job["seed"] is not None:
        extra["seed"] = job["seed"]
    common = dict(model=model, max_tokens=job["max_tokens"], temperature=job["temperature"], stream=True,
                  stream_options={"include_usage": True}, extra_body=extra)
    start = time.perf_counter()
    chunks, tokens, error = [], None, None
    try:
        if "messages" in job:
            stream = await client.chat.completions.create(messages=job["messages"], **common)
        else:
            stream = await client.completions.create(prompt=job["prompt"], **common)
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for c in chunk.choices:
                text = getattr(c, "text", None) or getattr(getattr(c, "delta", None), "content", None)
                if text or c.finish_reason:
                    chunks.append(time.perf_counter())
    except Exception as exc:   # counted, not raised: the load goes on
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    end = time.perf_counter()
    return {"start": start, "end": end, "first": chunks[0] if chunks else None, "chunks": chunks,
            "tokens": tokens, "error": error}


async def run_rate(url: str, model: str, jobs: list[dict], rate: float, args) -> dict:
    import openai
    rng = random.Random(args.seed + 1)
    gate = asyncio.Semaphore(args.max_concurrency)

    async def gated(job):
        async with gate:
            return await one(client, model, job, args)

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=args.api_key or "none", max_retries=0,
                                  timeout=args.timeout) as client:
        tasks, t0 = [], time.perf_counter()
        offset = 0.0
        for job in jobs:
            if math.isfinite(rate):
                offset += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            tasks.append(asyncio.create_task(gated(job)))
        results = await asyncio.gather(*tasks)
    return summarize(results)


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if r["error"] is None]
    errors = [r["error"] for r in results if r["error"] is not None]
    out = {"requests": len(results), "errors": len(errors)}
    if errors:
        out["first_error"] = errors[0]
    if not ok:
        return out
    span = max(r["end"] for r in ok) - min(r["start"] for r in ok)
    tokens = sum(r["tokens"] or 0 for r in ok)
    ttft = [(r["first"] or r["end"]) - r["start"] for r in ok]
    latency = [r["end"] - r["start"] for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    r3 = lambda x: None if x is None else round(x, 3)   # noqa: E731
    out.update({"throughput_tok_s": round(tokens / span, 1), "throughput_req_s": round(len(ok) / span, 2),
                "tokens": tokens, "wall_s": round(span, 2),
                "ttft_p50_s": r3(percentile(ttft, 50)), "ttft_p95_s": r3(percentile(ttft, 95)),
                "ttft_p99_s": r3(percentile(ttft, 99)),
                "chunk_gap_mean_s": r3(statistics.mean(gaps) if gaps else None),
                "chunk_gap_p50_s": r3(percentile(gaps, 50)), "chunk_gap_p95_s": r3(percentile(gaps, 95)),
                "latency_p50_s": r3(percentile(latency, 50)), "latency_p95_s": r3(percentile(latency, 95)),
                "latency_p99_s": r3(percentile(latency, 99)), "latency_mean_s": r3(statistics.mean(latency))})
    return out


def make_jobs(args, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    sizes = [int(x) for x in args.max_tokens.split(",")]
    if args.token_prompts:
        prompts = [{"prompt": [rng.randrange(10, args.vocab) for _ in range(args.token_prompts)]} for _ in range(n)]
    else:
        path = Path(args.gsm8k) if args.gsm8k else (default_gsm8k() if args.prompts == "gsm8k" else None)
        if args.prompts == "gsm8k" and path is None:
            sys.exit("--prompts gsm8k needs --gsm8k PATH (no ../shared/data/gsm8k/ here)")
        messages = gsm8k_messages(path, n, seed) if args.prompts == "gsm8k" else zoo_messages(n, seed)
        prompts = [{"messages": m} for m in messages]
    jobs = []
    for i, p in enumerate(prompts):
        sample = args.mixed and rng.random() < 1 / 3
        jobs.append({**p, "max_tokens": rng.choice(sizes), "temperature": 0.7 if sample else 0.0,
                     "seed": 1000 + i if sample else None})
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--serve", metavar="MODEL", help="start `dllm serve MODEL` here for the run")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="an option for dllm serve (repeat; write --serve-arg=--flag for flags)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs dllm serve")
    ap.add_argument("--model", default=None, help="the served model name to send (default: the server's first)")
    ap.add_argument("--api-key", default=os.environ.get("DLLM_API_KEY"))
    ap.add_argument("--rates", default="2,4,8,16", help="arrivals per second, comma-separated; inf = all at once")
    ap.add_argument("--requests", type=int, default=64, help="requests per rate")
    ap.add_argument("--max-concurrency", type=int, default=64, help="most requests in flight (client side)")
    ap.add_argument("--prompts", choices=("zoo", "gsm8k"), default="zoo")
    ap.add_argument("--gsm8k", default=None, help="GSM8K test.jsonl or its folder (default ../shared/data/gsm8k/)")
    ap.add_argument("--token-prompts", type=int, default=0, metavar="N",
                    help="random token-id prompts of N tokens through /v1/completions (a server without tokenizer)")
    ap.add_argument("--vocab", type=int, default=1000, help="token ids of --token-prompts are drawn below this")
    ap.add_argument("--max-tokens", default="32,64", help="max_tokens of each request, drawn from this list")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                    help="a third of the requests sample (temperature 0.7, seeded); the rest greedy")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--warmup", type=int, default=8, help="requests sent (all at once) before measuring")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="a name for this run in the JSON (e.g. static, continuous)")
    args = ap.parse_args()

    server = Server(args.serve, args.serve_arg, args.python) if args.serve else None
    url = server.url if server else args.url.rstrip("/")
    try:
        import httpx
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        setting = {"label": args.label, "url": url, "serve": args.serve, "serve_args": args.serve_arg,
                   "model": model, "requests": args.requests, "max_concurrency": args.max_concurrency,
                   "prompts": f"tokens x {args.token_prompts}" if args.token_prompts else args.prompts,
                   "max_tokens": args.max_tokens, "block_length": args.block_length, "mixed": args.mixed,
                   "ignore_eos": args.ignore_eos, "machine": platform.machine(), "cpus": os.cpu_count()}
        print("setting:", json.dumps(setting), flush=True)
        if args.warmup:
            asyncio.run(run_rate(url, model, make_jobs(args, args.warmup, args.seed + 99), math.inf, args))
        rows = []
        for rate in [float(r) for r in args.rates.split(",")]:
            jobs = make_jobs(args, args.requests, args.seed)       # the same requests at every rate
            before = scrape(url)
            result = asyncio.run(run_rate(url, model, jobs, rate, args))
            after = scrape(url)
            steps = after.get("dllm_scheduler_steps_total", 0) - before.get("dllm_scheduler_steps_total", 0)
            if steps and after.get("dllm_num_slots"):
                slot_steps = after["dllm_slot_steps_total"] - before.get("dllm_slot_steps_total", 0)
                result["slot_utilisation"] = round(slot_steps / (steps * after["dllm_num_slots"]), 3)
            rows.append({"rate": rate, **result})
            print(f"rate {rate:>5}/s " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    finally:
        if server:
            server.stop()
    record = {"setting": setting, "rows": rows}
    line = json.dumps(record)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "serve_load.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()

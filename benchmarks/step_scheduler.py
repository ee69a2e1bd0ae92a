"""Open-loop load on one engine: static batching against the step scheduler, same arrivals, same machine.

Requests arrive at Poisson times (zoo task prompts through the chat template, mixed max_tokens, so requests with
different settings arrive interleaved) and are decoded in one process, streaming:
  static      the server's policy before the step scheduler: when the engine is free, the settings group holding
              the oldest arrived request runs as one batch (up to --max-batch-size) from its first block to its
              last; requests arriving meanwhile wait for the whole batch
  continuous  `LLM.add_request` / `LLM.step` (dllm/scheduler.py): arrivals join at the next step
Per rate and mode: throughput (generated tokens / time from the first arrival to the last finish), time to first
text, latency (arrival to final output) p50/p95/p99. The last line is JSON.

    python benchmarks/step_scheduler.py --model tiny-llada --rates 4,8,16 --requests 48
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from dllm import LLM, SamplingParams
from dllm.engine import Request
from dllm.eval.tasks import get_task, to_messages


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def workload(llm: LLM, n: int, rate: float, seed: int) -> list[tuple[float, Request]]:
    """(arrival offset in seconds, request) pairs: prompts from the zoo tasks, max_tokens 32 or 64."""
    rng = random.Random(seed)
    problems = [p for name in ("arith", "gsm-lite", "code-lite") for p in get_task(name).generate("test", n)]
    rng.shuffle(problems)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        params = SamplingParams(max_tokens=rng.choice((32, 64)), block_length=32, temperature=0.0)
        prompt = llm._chat_prompts(to_messages(problems[i]))[0]
        request = llm._request(prompt, params)
        out.append((t, request))
    return out


class Clock:
    def __init__(self, arrivals):
        self.arrivals = arrivals
        self.t0 = time.perf_counter()
        self.first_text, self.done, self.tokens = {}, {}, 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def arrived(self, i: int) -> bool:
        return i < len(self.arrivals) and self.arrivals[i][0] <= self.now()

    def wait_for(self, i: int) -> None:
        time.sleep(max(0.0, self.arrivals[i][0] - self.now()))

    def record(self, event) -> None:
        if event.request_id not in self.first_text and (event.delta_text or event.output is not None):
            self.first_text[event.request_id] = self.now()
        if event.output is not None:
            self.done[event.request_id] = self.now()
            self.tokens += event.output.metrics.num_tokens

    def summary(self) -> dict:
        arrival = {r.request_id: t for t, r in self.arrivals}
        ttft = [self.first_text[k] - arrival[k] for k in self.done]
        latency = [self.done[k] - arrival[k] for k in self.done]
        span = max(self.done.values()) - min(arrival.values())
        return {"requests": len(self.done), "throughput_tok_s": round(self.tokens / span, 1),
                "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p95_s": round(percentile(ttft, 95), 3),
                "latency_p50_s": round(percentile(latency, 50), 3), "latency_p95_s": round(percentile(latency, 95), 3),
                "latency_p99_s": round(percentile(latency, 99), 3),
                "latency_mean_s": round(statistics.mean(latency), 3)}


def run_static(llm: LLM, arrivals, max_batch: int) -> dict:
    clock, nxt, waiting = Clock(arrivals), 0, []
    while nxt < len(arrivals) or waiting:
        while clock.arrived(nxt):
            waiting.append(arrivals[nxt][1])
            nxt += 1
        if not waiting:
            clock.wait_for(nxt)
            continue
        key = waiting[0].params.batch_key()
        batch = [r for r in waiting if r.params.batch_key() == key][:max_batch]
        waiting = [r for r in waiting if r not in batch]
        for event in llm.engine.run(batch, stream=True):
            clock.record(event)
    return clock.summary()


def run_continuous(llm: LLM, arrivals) -> dict:
    clock, nxt = Clock(arrivals), 0
    while nxt < len(arrivals) or llm.scheduler.has_unfinished():
        while clock.arrived(nxt):
            request = arrivals[nxt][1]
            request.arrival = None
            llm.scheduler.add(llm.engine, request)
            nxt += 1
        if not llm.scheduler.has_unfinished():
            clock.wait_for(nxt)
            continue
        for event in llm.scheduler.step():
            clock.record(event)
    return clock.summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llada")
    ap.add_argument("--cache", default="dual")
    ap.add_argument("--strategy", default="threshold")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rates", default="4,8,16", help="arrivals per second, comma-separated")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    llm = LLM(args.model, cache=args.cache, strategy=args.strategy, device=args.device,
              max_batch_size=args.max_batch_size)
    setting = {"model": args.model, "cache": args.cache, "strategy": args.strategy, "requests": args.requests,
               "max_batch_size": args.max_batch_size, "device": str(llm.engine.device), "torch": torch.__version__,
               "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}
    print("setting:", json.dumps(setting))
    warm = workload(llm, 4, 100.0, args.seed + 99)
    run_static(llm, warm, args.max_batch_size)                       # kernels and tokenizer warm
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        for mode in ("static", "continuous"):
            arrivals = workload(llm, args.requests, rate, args.seed)   # the same arrivals for both modes
            result = run_static(llm, arrivals, args.max_batch_size) if mode == "static" else run_continuous(llm, arrivals)
            rows.append({"rate": rate, "mode": mode, **result})
            print(f"rate {rate:5.1f}/s {mode:10s} " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    print(json.dumps({"setting": setting, "rows": rows}))


if __name__ == "__main__":
    main()

"""What the step scheduler's steps are made of under Poisson arrivals, in one process (no server): per trial,
throughput, latency, steps, mean step time, cohorts and rows running, model calls a step, rows of the merged
calls (real rows plus fillers) and the most frequent forward shapes (rows x fed width, `m` = merged over the pool).

Real config (random weights, `load_format="dummy"`), dual cache, reference strategy at one token a step, 64
random prompt tokens, `ignore_eos`. Trials:
  batched            the scheduler as it is (every cohort commits, then one status transfer for all)
  per-cohort-reads   each cohort's status read as soon as it has committed (the scheduler before batching)
  forwards-timed     as batched, with the device synchronised around every model call, so that
                     `host_ms_per_cohort` (step time outside the model calls, per cohort) means something

    python benchmarks/scheduler_steps.py --config-dir tests/data/checkpoints/LLaDA-8B-Instruct --rate 2 --requests 20

Prints one JSON line per trial, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from dllm import SamplingParams
from dllm.engine import StatusRead
from dllm.scheduler import Scheduler
from real_shape import dummy_llm

_BATCHED_AFTER_FORWARD = Scheduler._after_forward


def _per_cohort_reads(self, cohort, logits, out):
    read = _BATCHED_AFTER_FORWARD(self, cohort, logits, out)
    if read is not None:
        self._finish_step(cohort, StatusRead.fetch_all([read])[0], out)
    return None


class Recorder:
    """Wraps the runner: the shape of every model call, and (when timed) the device time of the merged calls."""

    def __init__(self, runner, device: str):
        self.device, self.timed, self.calls, self.forward_s = device, False, [], 0.0
        self._forward_merged, self._run = runner.forward_merged, runner._run
        runner.forward_merged, runner._run = self.forward_merged, self.run

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def forward_merged(self, calls):
        if not self.timed:
            return self._forward_merged(calls)
        self.sync()
        t = time.perf_counter()
        out = self._forward_merged(calls)
        self.sync()
        self.forward_s += time.perf_counter() - t
        return out

    def run(self, inputs, merged=False):
        self.calls.append((inputs.ids.shape[0], inputs.ids.shape[1], merged))
        return self._run(inputs, merged)


def trial(llm, rec: Recorder, args, label: str, rate: float, n: int, per_cohort: bool = False,
          timed: bool = False, **scheduler_kw) -> dict:
    rec.timed = timed
    Scheduler._after_forward = _per_cohort_reads if per_cohort else _BATCHED_AFTER_FORWARD
    llm.scheduler = sched = Scheduler(max_num_seqs=args.slots, **scheduler_kw)
    sp = SamplingParams(max_tokens=args.max_tokens, block_length=32, steps=args.max_tokens, ignore_eos=True,
                        temperature=0)
    rng = random.Random(args.seed)
    t, arrivals = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate) if rate != float("inf") else 0.0
        arrivals.append(t)
    vocab = llm.loaded.arch.vocab_size
    prompts = [[rng.randrange(2, min(vocab - 2, 100_000)) for _ in range(64)] for _ in range(n)]
    start, nxt, done, steps = time.perf_counter(), 0, {}, []
    while nxt < n or sched.has_unfinished():
        now = time.perf_counter() - start
        while nxt < n and arrivals[nxt] <= now:
            llm.add_request({"prompt_token_ids": prompts[nxt]}, sp, request_id=str(nxt))
            nxt += 1
        if not sched.has_unfinished():
            time.sleep(max(0.0, arrivals[nxt] - now))
            continue
        rec.forward_s, rec.calls = 0.0, []
        t0 = time.perf_counter()
        events = llm.step()
        rec.sync()
        steps.append((time.perf_counter() - t0, len(sched.cohorts), rec.forward_s, list(rec.calls),
                      sched.num_running))
        for e in events:
            if e.output is not None:
                done[e.request_id] = time.perf_counter() - start
    Scheduler._after_forward = _BATCHED_AFTER_FORWARD
    wall = time.perf_counter() - start
    latency = sorted(done[str(i)] - arrivals[i] for i in range(n))
    shapes: dict[str, int] = {}
    for s in steps:
        for rows, width, merged in s[3]:
            key = f"{rows}x{width}{'m' if merged else ''}"
            shapes[key] = shapes.get(key, 0) + 1
    merged_rows = [rows for s in steps for rows, _, merged in s[3] if merged]
    mode = "per-cohort-reads" if per_cohort else "forwards-timed" if timed else "batched"
    row = {"label": label, "mode": mode, "rate": rate, "requests": n, "scheduler": scheduler_kw,
           "wall_s": round(wall, 2), "tok_s": round(n * args.max_tokens / wall, 1),
           "latency_p50_s": round(latency[len(latency) // 2], 2), "latency_max_s": round(latency[-1], 2),
           "steps": len(steps), "step_ms_mean": round(statistics.mean(s[0] for s in steps) * 1e3, 2),
           "cohorts_mean": round(statistics.mean(s[1] for s in steps), 2),
           "running_mean": round(statistics.mean(s[4] for s in steps), 2),
           "calls_per_step": round(statistics.mean(len(s[3]) for s in steps), 2),
           "merged_rows_mean": round(statistics.mean(merged_rows), 1) if merged_rows else None,
           "top_shapes": sorted(((c, k) for k, c in shapes.items()), reverse=True)[:8]}
    if timed:
        row["forward_ms_mean"] = round(statistics.mean(s[2] for s in steps) * 1e3, 2)
        row["host_ms_per_cohort"] = round(statistics.mean((s[0] - s[2]) / max(1, s[1]) for s in steps) * 1e3, 3)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-dir", default="tests/data/checkpoints/LLaDA-8B-Instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", nargs="+", default=["per-cohort-reads", "forwards-timed", "batched"],
                    choices=["per-cohort-reads", "forwards-timed", "batched"])
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    llm = dummy_llm(args.config_dir, dtype=dtype, device=args.device, cache="dual", strategy="reference")
    rec = Recorder(llm.engine.runner, args.device)
    print(json.dumps({"setting": {"config": args.config_dir, "device": args.device, "dtype": dtype,
                                  "rate": args.rate, "requests": args.requests, "max_tokens": args.max_tokens,
                                  "slots": args.slots, "torch": torch.__version__}}), flush=True)
    trial(llm, rec, args, "warm-up", float("inf"), 4)          # graphs of the common shapes captured
    rows = [trial(llm, rec, args, f"rate {args.rate:g}", args.rate, args.requests,
                  per_cohort=mode == "per-cohort-reads", timed=mode == "forwards-timed") for mode in args.trials]
    print(json.dumps({"benchmark": "scheduler_steps", "rows": rows}))


if __name__ == "__main__":
    main()

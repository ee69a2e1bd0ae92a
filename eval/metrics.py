"""Speed and accuracy metrics of an evaluation run, computed from its per-sample records alone (so a resumed
run's summary is recomputed over every record, whichever session wrote it).

A record is one generated sample (`runner.py` writes them); the fields read here are `correct`, `tokens`,
`nfe`, `seconds`, `batch`, `batch_seconds`, `session`, `session_seconds` and `peak_memory_bytes`.
The definitions (also in `DEFINITIONS`, copied into every summary and report):

- tokens: the engine's `RequestMetrics.num_tokens`, generated tokens up to and including the first stop
  token, no prompt, no padding. Cutting the text at a task's stop string does not change it: the engine
  cannot see stop strings, and the tokens after one were generated (and paid for) all the same.
- tokens/s (per request) = tokens / latency of that request; reported as the mean over requests.
- throughput = total tokens / generation seconds, where generation seconds is the sum over batches of the
  wall time of the batch's engine call (tokenization and detokenization included; model loading, warm-up,
  scoring and file writes excluded); with `--data-parallel-size N` the N engines run side by side, so a run's
  generation seconds are the slowest engine's sum.
- NFE: model forwards while the request was in its batch (the engine's count); reported as the mean.
- tokens per forward (TPF) = total tokens / total NFE.
- re-masked: committed tokens a remasking strategy (saber) turned back into MASK, per request; the mean.
- latency: the engine's per-request latency, from the start of its batch's decoding to the moment the
  request's output was final; p50 and p95 by linear interpolation between the closest ranks (numpy's default).
- wall seconds: the sum over sessions (calls that generated something) of the time from the call's start
  (task data and model loading, warm-up, scoring and writes included) to its last record.
- peak GPU memory: the largest `torch.cuda.max_memory_allocated()` any batch reported; None on CPU.
"""
from __future__ import annotations

import math

DEFINITIONS = {
    "accuracy": "fraction of samples whose completion the task's checker accepts (all samples of all docs)",
    "tokens": "generated tokens up to and including the first stop token; no prompt, no padding; cutting the "
              "text at a task stop string does not change the count",
    "tokens_per_second": "mean over requests of tokens / latency",
    "throughput": "total tokens / generation seconds (sum over batches of the engine call's wall time)",
    "nfe": "mean model forwards per request while it was in its batch",
    "tokens_per_forward": "total tokens / total NFE",
    "remasked": "mean over requests of committed tokens turned back into MASK (remasking strategies; else 0)",
    "kv_fraction": "mean over requests of the token x layer K/V computations made / those of the same forwards "
                   "without a cache (1.0 without a cache)",
    "latency_p50_s, latency_p95_s": "per-request latency from its batch's start to its final output; "
                                    "percentiles by linear interpolation between closest ranks",
    "wall_seconds": "sum over sessions of the time from the call's start (data and model loading included) to its "
                    "last record",
    "peak_gpu_memory_gib": "largest torch.cuda.max_memory_allocated() over batches; null on CPU",
}


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0 <= q <= 100) by linear interpolation between closest ranks: rank
    r = q / 100 * (n - 1) into the sorted values, as numpy.percentile's default. None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def generation_seconds(records: list[dict]) -> float:
    """Sum of the batch wall times, each batch counted once; batches that data-parallel engines ran side by side
    (records with `dp_rank` within one session) count as the slowest engine's total, not their sum."""
    per_rank: dict[tuple, float] = {}
    for batch, (session, rank, seconds) in {r["batch"]: (r["session"], r.get("dp_rank"), r["batch_seconds"])
                                            for r in records}.items():
        per_rank[session, rank] = per_rank.get((session, rank), 0.0) + seconds
    sessions: dict[str, float] = {}
    for (session, rank), seconds in per_rank.items():
        sessions[session] = max(sessions.get(session, 0.0), seconds) if rank is not None else \
            sessions.get(session, 0.0) + seconds
    return sum(sessions.values())


def wall_seconds(records: list[dict]) -> float:
    """Sum over sessions of the session's elapsed time at its last record."""
    last: dict[str, float] = {}
    for r in records:
        last[r["session"]] = max(last.get(r["session"], 0.0), r["session_seconds"])
    return sum(last.values())


def speed_metrics(records: list[dict]) -> dict:
    """Throughput, tokens/s, NFE, TPF, latency percentiles, wall time and peak memory of `records`."""
    tokens = sum(r["tokens"] for r in records)
    nfe = sum(r["nfe"] for r in records)
    gen_s = generation_seconds(records)
    latencies = [r["seconds"] for r in records]
    memory = [r["peak_memory_bytes"] for r in records if r.get("peak_memory_bytes") is not None]
    return {
        "tokens_per_second": _mean([r["tokens"] / r["seconds"] for r in records if r["seconds"] > 0]),
        "throughput": tokens / gen_s if gen_s > 0 else None,
        "nfe": _mean([r["nfe"] for r in records]),
        "tokens": _mean([r["tokens"] for r in records]),
        "tokens_per_forward": tokens / nfe if nfe else None,
        "remasked": _mean([r.get("remasked", 0) for r in records]),
        "kv_fraction": _mean([r["kv_fraction"] for r in records if r.get("kv_fraction") is not None]),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "total_tokens": tokens,
        "generation_seconds": gen_s,
        "wall_seconds": wall_seconds(records),
        "peak_gpu_memory_gib": max(memory) / 2 ** 30 if memory else None,
    }


def summarize(records: list[dict], task_metrics: dict) -> dict:
    """All metrics of a run: counts, accuracy, the task's own aggregate metrics, then the speed metrics."""
    return {
        "num_samples": len(records),
        "num_docs": len({r["doc_id"] for r in records}),
        "accuracy": _mean([float(bool(r["correct"])) for r in records]),
        **task_metrics,
        **speed_metrics(records),
    }


def pareto_front(points: list[tuple[float | None, float | None]]) -> list[bool]:
    """For each (speed, quality) point, whether it is on the Pareto front (both higher is better): no other
    point is at least as good on both and strictly better on one. Points with a None are never on it."""
    valid = [(x, y) for x, y in points if x is not None and y is not None]

    def dominated(x: float, y: float) -> bool:
        return any(a >= x and b >= y and (a > x or b > y) for a, b in valid)

    return [x is not None and y is not None and not dominated(x, y) for x, y in points]

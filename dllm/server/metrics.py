"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand: counters, gauges
and histograms with labels, nothing else. `ServerMetrics` names what the server records.

Not thread-safe by design: every update runs on the event loop's thread (the engine worker hands its events
to the loop first), so no lock is needed.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self.values: dict[tuple, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
                                for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    """A value read when scraped (`read` is called on the event loop)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        super().__init__(name, help)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.read())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        super().__init__(name, help)
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum, self.count, self.max = 0.0, 0, 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1
        self.max = max(self.max, value)

    def render(self) -> list[str]:
        lines, cumulative = self.header(), 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        return lines + [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]


class ServerMetrics:
    """Everything `GET /metrics` shows. `queue_depth` and `num_running` read the engine client's state."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0, num_running: Callable[[], int] = lambda: 0):
        self.http_requests = Counter("dllm_http_requests_total", "HTTP requests answered, by route and status",
                                     ("path", "status"))
        self.requests_finished = Counter("dllm_requests_finished_total",
                                         "Engine requests (one per choice) finished, by finish reason",
                                         ("finish_reason",))
        self.prompt_tokens = Counter("dllm_prompt_tokens_total", "Prompt tokens of finished engine requests")
        self.generation_tokens = Counter("dllm_generation_tokens_total",
                                         "Generated tokens (up to and including the first stop token)")
        self.nfe = Counter("dllm_nfe_total", "Model forward calls of finished engine requests, summed per request")
        self.remasked = Counter("dllm_remasked_tokens_total",
                                "Committed tokens turned back into MASK by remasking strategies (saber)")
        self.batches = Counter("dllm_batches_total", "Engine batches run")
        self.batch_size = Histogram("dllm_batch_size", "Engine requests decoded together in one batch", BATCH_BUCKETS)
        self.queue_time = Histogram("dllm_request_queue_seconds", "Time from arrival to the start of its batch",
                                    LATENCY_BUCKETS)
        self.first_text = Histogram("dllm_time_to_first_token_seconds",
                                    "Time from arrival to the first final text (or the end) of a request",
                                    LATENCY_BUCKETS)
        self.latency = Histogram("dllm_request_latency_seconds", "Time from arrival to the final output",
                                 LATENCY_BUCKETS)
        self.waiting = Gauge("dllm_num_requests_waiting", "Engine requests queued, not yet in a batch", queue_depth)
        self.running = Gauge("dllm_num_requests_running", "Engine requests in the batch being decoded", num_running)
        self.max_batch = Gauge("dllm_batch_size_max", "Largest batch run since start", lambda: self.batch_size.max)

    def render(self) -> str:
        metrics = (self.http_requests, self.requests_finished, self.prompt_tokens, self.generation_tokens, self.nfe,
                   self.remasked, self.batches, self.batch_size, self.max_batch, self.queue_time, self.first_text, self.latency,
                   self.waiting, self.running)
        return "\n".join(line for m in metrics for line in m.render()) + "\n"

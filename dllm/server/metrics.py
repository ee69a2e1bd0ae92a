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
    """Everything `GET /metrics` shows. `queue_depth`, `num_running` and `slots_in_use` read the engine client's
    state (its step scheduler's, as of the latest step); `num_slots` is its --max-batch-size."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0, num_running: Callable[[], int] = lambda: 0,
                 slots_in_use: Callable[[], int] = lambda: 0, num_slots: int = 1):
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
        self.batches = Counter("dllm_batches_total", "Cohorts started: engine requests admitted together at one "
                               "scheduler step with the same settings (they share a forward a step)")
        self.batch_size = Histogram("dllm_batch_size", "Engine requests per cohort started", BATCH_BUCKETS)
        self.queue_time = Histogram("dllm_request_queue_seconds", "Time from arrival to the step that admits it",
                                    LATENCY_BUCKETS)
        self.steps = Counter("dllm_scheduler_steps_total", "Scheduler steps run (one forward per running cohort)")
        self.slot_steps = Counter("dllm_slot_steps_total", "Slots in use summed over scheduler steps (mean slot "
                                  "utilisation = this / (dllm_scheduler_steps_total x dllm_num_slots))")
        self.first_text = Histogram("dllm_time_to_first_token_seconds",
                                    "Time from arrival to the first final text (or the end) of a request",
                                    LATENCY_BUCKETS)
        self.latency = Histogram("dllm_request_latency_seconds", "Time from arrival to the final output",
                                 LATENCY_BUCKETS)
        self.waiting = Gauge("dllm_num_requests_waiting", "Engine requests queued, not decoding yet (no free slot "
                             "or arrived during the current step)", queue_depth)
        self.running = Gauge("dllm_num_requests_running", "Engine requests decoding (holding slots)", num_running)
        self.num_slots = Gauge("dllm_num_slots", "Decoding slots (rows; --max-batch-size)", lambda: num_slots)
        self.slots_used = Gauge("dllm_slots_in_use", "Slots held by decoding requests (2 for a cfg_scale request)",
                                slots_in_use)
        self.slot_utilisation = Gauge("dllm_slot_utilization", "Fraction of the slots in use now",
                                      lambda: slots_in_use() / num_slots)
        self.max_batch = Gauge("dllm_batch_size_max", "Largest batch run since start", lambda: self.batch_size.max)

    def render(self) -> str:
        metrics = (self.http_requests, self.requests_finished, self.prompt_tokens, self.generation_tokens, self.nfe,
                   self.remasked, self.batches, self.batch_size, self.max_batch, self.queue_time, self.first_text, self.latency,
                   self.waiting, self.running, self.steps, self.slot_steps, self.num_slots, self.slots_used,
                   self.slot_utilisation)
        return "\n".join(line for m in metrics for line in m.render()) + "\n"

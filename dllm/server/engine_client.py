"""The async front of the engine: the server's step scheduler (dllm/scheduler.py), stepped by one worker thread.

    submit([(engine, request), ...]) -> RequestHandle        (on the event loop; raises 429 / 503 ApiErrors)
    async for event in handle: ...                          StreamEvents of those requests, as they happen
    handle.cancel([request_id])                             drop the rest of its events (client gone, stop hit)

Scheduling is continuous batching: the event loop runs one scheduler step at a time on the worker thread and,
between steps, hands the requests that arrived meanwhile to the scheduler and takes cancelled ones out of it. So
a request that arrives while others decode starts at the next step (in a free slot; `max_batch_size` slots, a
classifier-free-guidance request takes two), a finished or cancelled one frees its slot at the next step, and
each step runs one model call per forward shape over the running requests (see dllm/scheduler.py).
When nothing decodes, the first arrival waits up to `max_wait_ms` (or until `max_batch_size` requests have come)
so that a burst starts as one cohort. The running rows hold at most `max_num_batched_tokens` canvas columns
(prompt + canvas, twice that with cfg_scale, summed over rows); `check_size` refuses a request that alone is over
it, or over `max_model_len`. Requests the slots cannot take yet wait, oldest first (up to `max_queue_size` in
all; more are refused with 429).

Isolation: a cohort that fails (the engine raised) is decoded again one request at a time, so only the faulty
request fails. Every request carries a seed (serving_common.py gives one to requests without), so the replay
reproduces what the cohort already streamed; those events are skipped and the rest follows.

Shutdown: `drain(timeout_s)` (on SIGTERM/SIGINT) refuses new requests with 503 and lets the queued and running
ones finish; past `timeout_s` it ends each of them with a 503 `ApiError` (the stream then sends its error event
and `[DONE]`) and drops the running ones after the current step.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus

from dllm.engine import Engine, Request
from dllm.errors import DllmError
from dllm.outputs import StreamEvent
from dllm.scheduler import Failure, Scheduler, columns
from dllm.server.errors import ApiError, EngineFailedError, QueueFullError, ServerClosingError
from dllm.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

_WAKE = object()  # put in a handle's queue to make its reader re-check for cancelled requests


@dataclass(eq=False)
class _Item:
    """One engine request (one choice of one HTTP request) from arrival to its final event."""

    request: Request
    engine: Engine
    handle: "RequestHandle"
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by the handle's reader
    cancel_reason: str = "cancelled"  # the finish_reason metrics record for it
    done: bool = False
    has_text: bool = False
    delivered: int = 0       # events handed to the handle
    skip: int = 0            # events of a replay (a retry alone) that were delivered already


class RequestHandle:
    """The StreamEvents of one HTTP request's engine requests; `async for` ends when each has finished or been
    cancelled, and raises an `ApiError` if decoding failed or the server shut down first."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self.items: dict[str, _Item] = {}
        self._error: ApiError | None = None

    def __aiter__(self):
        return self._events()

    async def _events(self):
        open_ids = set(self.items)
        while open_ids:
            event = await self._queue.get()
            if isinstance(event, ApiError):
                raise event
            open_ids = {rid for rid in open_ids if not self.items[rid].cancelled}
            if event is _WAKE or event.request_id not in open_ids:
                continue
            if event.output is not None:
                open_ids.discard(event.request_id)
            yield event
        # the server marks the requests it aborts as cancelled before it queues their error, so an event queued
        # earlier can end the loop on that flag: the error still ends the iteration
        if self._error is not None:
            raise self._error

    def cancel(self, request_id: str | None = None, reason: str = "cancelled") -> None:
        """Cancel one engine request of this handle, or all of them; their later events are dropped. `reason`
        is what metrics count it as (a choice ended early by a stop string is "stop", not an abort)."""
        for rid in [request_id] if request_id is not None else list(self.items):
            item = self.items[rid]
            if not item.cancelled:
                item.cancelled, item.cancel_reason = True, reason
        self._queue.put_nowait(_WAKE)

    def _put(self, event: StreamEvent | ApiError) -> None:
        if isinstance(event, ApiError) and self._error is None:
            self._error = event
        self._queue.put_nowait(event)


class EngineClient:
    def __init__(self, llm, *, max_batch_size: int = 32, max_wait_ms: float = 10.0, max_queue_size: int = 256,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None,
                 max_num_cohorts: int | None = None):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue_size", max_queue_size),
                            ("max_model_len", max_model_len), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_num_cohorts", max_num_cohorts)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise DllmError(f"{name} must be a positive integer, got {value!r}")
        if max_wait_ms < 0:
            raise DllmError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        context = llm.spec.max_length
        if max_model_len is not None and max_model_len > context:
            raise DllmError(f"--max-model-len {max_model_len} is over the model's context of {context} tokens; "
                            f"use at most {context}")
        self.llm = llm
        self.max_model_len = max_model_len or context
        self.max_num_batched_tokens = max_num_batched_tokens or max_batch_size * 2 * self.max_model_len
        self.max_batch_size, self.max_wait_s, self.max_queue_size = max_batch_size, max_wait_ms / 1000, max_queue_size
        # touched by the worker thread during a step and by the event loop only between steps
        self.scheduler = Scheduler(max_num_seqs=max_batch_size, max_num_batched_tokens=self.max_num_batched_tokens,
                                   isolate=True, max_num_cohorts=max_num_cohorts)
        self._engines = {(llm.engine.cache_name, llm.engine.strategy_name): llm.engine}
        self._incoming: collections.deque[_Item] = collections.deque()   # not yet handed to the scheduler
        self._items: dict[str, _Item] = {}                                 # in the scheduler, unfinished
        self._counts = (0, 0, 0)   # the scheduler's (waiting, running, slots in use) after the latest step
        self.metrics = ServerMetrics(lambda: self.num_waiting, lambda: self.num_running,
                                     lambda: self._counts[2], max_batch_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False   # the running requests are dropped after the current step
        self._draining = False  # no new requests

    @property
    def num_waiting(self) -> int:
        """Engine requests not decoding yet: arrived since the latest step, or waiting for a slot."""
        return len(self._incoming) + self._counts[0]

    @property
    def num_running(self) -> int:
        return self._counts[1]

    @property
    def is_ready(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing and not self._draining

    @staticmethod
    def columns(request: Request) -> int:
        """The canvas columns `request` takes in a batch: prompt + canvas, twice with classifier-free guidance."""
        return columns(request)

    def check_request_count(self, count: int) -> None:
        """Refuse (400) one HTTP request that needs more engine requests than the queue holds."""
        if count > self.max_queue_size:
            raise ApiError(f"this request needs {count} engine requests (prompts x n), more than the "
                           f"server's --max-queue-size {self.max_queue_size}; send fewer prompts or a smaller n",
                           param="n")

    def check_size(self, request: Request) -> None:
        """Refuse (400) a request over --max-model-len or, alone, over --max-num-batched-tokens."""
        n = len(request.prompt_token_ids) + request.params.max_tokens
        if n > self.max_model_len:
            raise ApiError(f"max_tokens {request.params.max_tokens} plus the prompt's {len(request.prompt_token_ids)} "
                           f"tokens exceeds the server's --max-model-len {self.max_model_len}; lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        columns = self.columns(request)
        if columns > self.max_num_batched_tokens:
            raise ApiError(f"this request takes {columns} batch tokens (prompt + max_tokens"
                           f"{', doubled by cfg_scale' if request.params.cfg_scale > 0 else ''}), more than the "
                           f"server's --max-num-batched-tokens {self.max_num_batched_tokens}; lower max_tokens",
                           param="max_tokens")

    def engine(self, cache: str | None = None, strategy: str | None = None) -> Engine:
        """The engine for a cache and strategy (the server's own when None); all share the loaded model. The
        server's cache and strategy options apply when a request picks the server's own cache or strategy."""
        default = self.llm.engine
        key = (cache or default.cache_name, strategy or default.strategy_name)
        if key == (default.cache_name, default.strategy_name):
            return default
        if key not in self._engines:
            self._engines[key] = Engine(
                self.llm.loaded, cache=key[0], strategy=key[1],
                cache_options=default.cache_options if key[0] == default.cache_name else None,
                strategy_options=default.strategy_options if key[1] == default.strategy_name else None,
                runner=default.runner)   # its storage, graphs and --enforce-eager (or tensor-parallel group)
        return self._engines[key]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._schedule(), name="dllm-scheduler")

    def submit(self, requests: list[tuple[Engine, Request]]) -> RequestHandle:
        if not self.is_ready:
            if self._task is not None and self._task.done() and not self._closing and not self._draining:
                raise ApiError("the engine's scheduler stopped after an error (see the server log); restart "
                               "the server", HTTPStatus.SERVICE_UNAVAILABLE, code="engine_stopped")
            raise ServerClosingError()
        self.check_request_count(len(requests))
        self._drop_cancelled()
        if self.num_waiting + len(requests) > self.max_queue_size:
            raise QueueFullError(self.max_queue_size)
        handle = RequestHandle()
        for engine, request in requests:
            item = _Item(request, engine, handle)
            handle.items[request.request_id] = item
            self._incoming.append(item)
        self._wakeup.set()
        return handle

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests (503) and give the queued and running ones `timeout_s` seconds to finish; then
        end each of them with a 503 error. True when everything finished in time."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while (self._incoming or self._items) and time.monotonic() < deadline and not self._closing:
            await asyncio.sleep(0.05)
        clean = not (self._incoming or self._items)
        if not clean:
            logger.warning("%d requests still in flight after the %g s shutdown timeout; answering them 503",
                           len(self._incoming) + len(self._items), timeout_s)
        self.abort_all()
        return clean

    def abort_all(self) -> None:
        """End every queued and running request with a 503 `ServerClosingError`; the running ones are dropped
        after the current step."""
        self._closing = True
        for item in [*self._incoming, *self._items.values()]:
            if not item.cancelled and not item.done:
                item.cancelled, item.cancel_reason = True, "abort"
                item.handle._put(ServerClosingError())
        self._incoming.clear()
        if self._wakeup is not None:
            self._wakeup.set()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Refuse new requests, fail the waiting and running ones with 503, drop the running ones after the
        current step, and wait up to `timeout_s` for the worker to notice."""
        self.abort_all()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except asyncio.TimeoutError:
                logger.warning("the running step did not end within %.0f s; leaving it behind", timeout_s)
        self._executor.shutdown(wait=False)

    # ------------------------------------------------------------------ the loop: hand over, step, deliver

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while await self._has_work():
                self._hand_over()
                if not self.scheduler.has_unfinished():
                    continue
                start = time.perf_counter()
                events = await loop.run_in_executor(self._executor, self.scheduler.step)
                self._after_step(events, start)
        except Exception as exc:  # a bug here: answer everyone now rather than leave them waiting forever
            logger.exception("the scheduler stopped")
            for item in [*self._items.values(), *self._incoming]:
                if not item.done:
                    item.handle._put(EngineFailedError(exc))
            self._items.clear()
            self._incoming.clear()
        finally:
            self.scheduler.close()   # (no step is running: every step is awaited)
            self._counts = (0, 0, 0)
            self._items.clear()

    async def _has_work(self) -> bool:
        """Wait until there is something to do: a step to run, or (when nothing decodes) arrivals that waited
        `max_wait_ms` or fill `max_batch_size`. False when the client is closing."""
        while not self._closing:
            self._drop_cancelled()
            self._drop_cancelled_items()
            if self.scheduler.has_unfinished():
                return True
            wait = None
            if self._incoming:
                wait = self._incoming[0].arrival + self.max_wait_s - time.perf_counter()
                if len(self._incoming) >= self.max_batch_size or wait <= 0:
                    return True
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait)
            except asyncio.TimeoutError:
                pass
        return False

    def _drop_cancelled(self) -> None:
        """Arrivals cancelled before they reached the scheduler."""
        if any(item.cancelled for item in self._incoming):
            for item in self._incoming:
                if item.cancelled:
                    self.metrics.requests_finished.inc(1, item.cancel_reason)
            self._incoming = collections.deque(item for item in self._incoming if not item.cancelled)

    def _drop_cancelled_items(self) -> None:
        """Cancelled requests leave the scheduler: their slots are free at the next step."""
        for rid, item in list(self._items.items()):
            if item.cancelled:
                self.scheduler.abort(rid)
                del self._items[rid]
                if not item.done:
                    self.metrics.requests_finished.inc(1, item.cancel_reason)
        self._count()

    def _hand_over(self) -> None:
        """Between steps: cancelled requests out, arrivals in (checked again by the scheduler)."""
        self._drop_cancelled()
        self._drop_cancelled_items()
        while self._incoming:
            item = self._incoming.popleft()
            try:
                self.scheduler.add(item.engine, item.request)
            except DllmError as exc:
                item.done = True
                item.handle._put(ApiError(str(exc)))
                continue
            self._items[item.request.request_id] = item
        self._count()

    def _count(self) -> None:
        s = self.scheduler
        self._counts = (s.num_waiting, s.num_running, s.slots_in_use)

    def _after_step(self, events: list[StreamEvent], start: float) -> None:
        m = self.metrics
        m.steps.inc()
        m.slot_steps.inc(self._counts[2])
        for requests in self.scheduler.admitted:
            m.batches.inc()
            m.batch_size.observe(len(requests))
            for r in requests:
                item = self._items.get(r.request_id)
                if item is not None:
                    m.queue_time.observe(start - item.arrival)
        for failure in self.scheduler.take_failures():
            self._failed(failure)
        for event in events:
            self._deliver(event)
        self._count()

    def _failed(self, failure: Failure) -> None:
        item = self._items.get(failure.request_id)
        exc = failure.error
        if failure.retried:
            logger.warning("a cohort failed (%s: %r); decoding its request %s again alone", type(exc).__name__,
                           str(exc)[:200], failure.request_id)
            if item is not None:
                item.skip = item.delivered
            return
        if isinstance(exc, DllmError):
            error = ApiError(str(exc))
        else:  # a bug, a device failure or a request the checks let through
            logger.error("decoding request %s failed: %s: %r", failure.request_id, type(exc).__name__,
                         str(exc)[:500], exc_info=(type(exc), exc, exc.__traceback__)
                         if logger.isEnabledFor(logging.DEBUG) else None)
            error = EngineFailedError(exc)
        if item is not None:
            del self._items[failure.request_id]
            if not item.cancelled:
                item.done = True
                item.handle._put(error)

    def _deliver(self, event: StreamEvent) -> None:
        item = self._items.get(event.request_id)
        if item is None or item.cancelled:
            return
        if item.skip > 0:   # a replay of what was delivered before its cohort failed
            item.skip -= 1
            if event.output is None:
                return
            event = dataclasses.replace(event, delta_text="", delta_token_ids=[])   # never drop the end
        item.delivered += 1
        now = time.perf_counter()
        if not item.has_text and (event.delta_text or event.output is not None):
            item.has_text = True
            self.metrics.first_text.observe(now - item.arrival)
        if event.output is not None:
            item.done = True
            del self._items[event.request_id]
            out, m = event.output, self.metrics
            m.requests_finished.inc(1, out.finish_reason)
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            m.generation_tokens.inc(out.metrics.num_tokens)
            m.nfe.inc(out.metrics.nfe)
            m.remasked.inc(out.metrics.num_remasked)
            m.latency.observe(now - item.arrival)
        item.handle._put(event)

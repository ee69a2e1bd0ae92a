"""The async front of the engine: a batching queue on the event loop, one worker thread that owns the decoding.

    submit([(engine, request), ...]) -> RequestHandle        (on the event loop; raises 429 / 503 ApiErrors)
    async for event in handle: ...                          StreamEvents of those requests, as they happen
    handle.cancel([request_id])                             drop the rest of its events (client gone, stop hit)

Scheduling: waiting requests are grouped by batch key (engine cache and strategy + `SamplingParams.batch_key()`:
requests that can share one canvas). When the worker is free, the group holding the oldest waiting request
runs next, as soon as it has `max_batch_size` requests or its oldest request has waited `max_wait_ms`; other
groups wait their turn (queued, never refused, up to `max_queue_size` waiting requests in all).

Threads: only the worker thread touches the model; it hands each StreamEvent to the loop with
`loop.call_soon_threadsafe`, so handles, the queue and the metrics are only touched on the loop's thread.
The engine cannot drop a row mid-batch: a cancelled request keeps decoding in its batch with its events
discarded, and a batch whose unfinished requests are all cancelled is abandoned at its next step.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus

from dllm.engine import Engine, Request
from dllm.errors import DllmError
from dllm.outputs import StreamEvent
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
    cancelled: bool = False  # set on the loop thread, read by the worker thread
    cancel_reason: str = "cancelled"  # the finish_reason metrics record for it
    done: bool = False
    has_text: bool = False

    @property
    def key(self) -> tuple:
        return self.engine.cache_name, self.engine.strategy_name, self.request.params.batch_key()


class RequestHandle:
    """The StreamEvents of one HTTP request's engine requests; `async for` ends when each has finished or been
    cancelled, and raises an `ApiError` if decoding failed or the server shut down first."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self.items: dict[str, _Item] = {}

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

    def cancel(self, request_id: str | None = None, reason: str = "cancelled") -> None:
        """Cancel one engine request of this handle, or all of them; their later events are dropped. `reason`
        is what metrics count it as (a choice ended early by a stop string is "stop", not an abort)."""
        for rid in [request_id] if request_id is not None else list(self.items):
            item = self.items[rid]
            if not item.cancelled:
                item.cancelled, item.cancel_reason = True, reason
        self._queue.put_nowait(_WAKE)

    def _put(self, event: StreamEvent | ApiError) -> None:
        self._queue.put_nowait(event)


class EngineClient:
    def __init__(self, llm, *, max_batch_size: int = 32, max_wait_ms: float = 10.0, max_queue_size: int = 256):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue_size", max_queue_size)):
            if not isinstance(value, int) or value < 1:
                raise DllmError(f"{name} must be a positive integer, got {value!r}")
        if max_wait_ms < 0:
            raise DllmError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.llm = llm
        self.max_batch_size, self.max_wait_s, self.max_queue_size = max_batch_size, max_wait_ms / 1000, max_queue_size
        self.metrics = ServerMetrics(lambda: self.num_waiting, lambda: self.num_running)
        self._engines = {(llm.engine.cache_name, llm.engine.strategy_name): llm.engine}
        self._waiting: dict[tuple, collections.deque[_Item]] = {}
        self._running: dict[str, _Item] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def num_waiting(self) -> int:
        return sum(len(group) for group in self._waiting.values())

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def is_ready(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

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
                strategy_options=default.strategy_options if key[1] == default.strategy_name else None)
        return self._engines[key]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._schedule(), name="dllm-scheduler")

    def submit(self, requests: list[tuple[Engine, Request]]) -> RequestHandle:
        if not self.is_ready:
            if self._task is not None and self._task.done() and not self._closing:
                raise ApiError("the engine's batch scheduler stopped after an error (see the server log); restart "
                               "the server", HTTPStatus.SERVICE_UNAVAILABLE, code="engine_stopped")
            raise ServerClosingError()
        if len(requests) > self.max_queue_size:
            raise ApiError(f"this request needs {len(requests)} engine requests (prompts x n), more than the "
                           f"server's --max-queue-size {self.max_queue_size}; send fewer prompts or a smaller n",
                           param="n")
        self._drop_cancelled()
        if self.num_waiting + len(requests) > self.max_queue_size:
            raise QueueFullError(self.max_queue_size)
        handle = RequestHandle()
        for engine, request in requests:
            item = _Item(request, engine, handle)
            handle.items[request.request_id] = item
            self._waiting.setdefault(item.key, collections.deque()).append(item)
        self._wakeup.set()
        return handle

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Refuse new requests, fail the waiting ones with 503, abandon the running batch at its next step."""
        self._closing = True
        for group in self._waiting.values():
            for item in group:
                item.handle._put(ServerClosingError())
        self._waiting.clear()
        if self._task is not None:
            self._wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except asyncio.TimeoutError:
                logger.warning("the running batch did not stop within %.0f s; leaving it behind", timeout_s)
        self._executor.shutdown(wait=False)

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (batch := await self._next_batch()) is not None:
                self._start_batch(batch)
                error = await loop.run_in_executor(self._executor, self._run_batch, batch)
                self._end_batch(batch, error)
        except Exception as exc:  # a bug here: answer everyone now rather than leave them waiting forever
            logger.exception("the batch scheduler stopped")
            for item in [*self._running.values(), *(i for group in self._waiting.values() for i in group)]:
                item.handle._put(EngineFailedError(exc))
            self._running.clear()
            self._waiting.clear()

    async def _next_batch(self) -> list[_Item] | None:
        while not self._closing:
            self._drop_cancelled()
            wait = None
            if self._waiting:
                key, group = min(self._waiting.items(), key=lambda kv: kv[1][0].arrival)
                wait = group[0].arrival + self.max_wait_s - time.perf_counter()
                if len(group) >= self.max_batch_size or wait <= 0:
                    return self._take(key)
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait)
            except asyncio.TimeoutError:
                pass
        return None

    def _drop_cancelled(self) -> None:
        for key in list(self._waiting):
            group = self._waiting[key]
            kept = collections.deque(item for item in group if not item.cancelled)
            for item in group:
                if item.cancelled:
                    self.metrics.requests_finished.inc(1, item.cancel_reason)
            if kept:
                self._waiting[key] = kept
            else:
                del self._waiting[key]

    def _take(self, key: tuple) -> list[_Item]:
        group = self._waiting[key]
        batch = [group.popleft() for _ in range(min(self.max_batch_size, len(group)))]
        if not group:
            del self._waiting[key]
        return batch

    def _start_batch(self, batch: list[_Item]) -> None:
        now = time.perf_counter()
        for item in batch:
            self._running[item.request.request_id] = item
            self.metrics.queue_time.observe(now - item.arrival)
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(len(batch))

    def _run_batch(self, batch: list[_Item]) -> ApiError | None:
        """Worker thread: decode one batch, handing every event to the loop. Returns the error that ended it."""
        finished: set[str] = set()
        events = iter(())
        try:
            events = batch[0].engine.run([item.request for item in batch])
            for event in events:
                self._loop.call_soon_threadsafe(self._deliver, event)
                if event.output is not None:
                    finished.add(event.request_id)
                if self._closing or all(i.cancelled or i.request.request_id in finished for i in batch):
                    break
        except DllmError as exc:
            return ApiError(str(exc))
        except Exception as exc:  # a bug or a device failure: fail this batch's requests, keep serving
            logger.exception("decoding a batch of %d requests failed", len(batch))
            return EngineFailedError(exc)
        finally:
            if hasattr(events, "close"):
                events.close()
        return None

    def _deliver(self, event: StreamEvent) -> None:
        item = self._running.get(event.request_id)
        if item is None or item.cancelled:
            return
        now = time.perf_counter()
        if not item.has_text and (event.delta_text or event.output is not None):
            item.has_text = True
            self.metrics.first_text.observe(now - item.arrival)
        if event.output is not None:
            item.done = True
            out, m = event.output, self.metrics
            m.requests_finished.inc(1, out.finish_reason)
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            m.generation_tokens.inc(out.metrics.num_tokens)
            m.nfe.inc(out.metrics.nfe)
            m.remasked.inc(out.metrics.num_remasked)
            m.latency.observe(now - item.arrival)
        item.handle._put(event)

    def _end_batch(self, batch: list[_Item], error: ApiError | None) -> None:
        for item in batch:
            self._running.pop(item.request.request_id, None)
            if item.cancelled and not item.done:
                self.metrics.requests_finished.inc(1, item.cancel_reason)
            elif not item.done:
                item.handle._put(error or (ServerClosingError() if self._closing else EngineFailedError(
                    RuntimeError("the batch ended without an output for this request"))))

"""The async front of the engine: a batching queue on the event loop, one worker thread that owns the decoding.

    submit([(engine, request), ...]) -> RequestHandle        (on the event loop; raises 429 / 503 ApiErrors)
    async for event in handle: ...                          StreamEvents of those requests, as they happen
    handle.cancel([request_id])                             drop the rest of its events (client gone, stop hit)

Scheduling: waiting requests are grouped by batch key (engine cache and strategy + `SamplingParams.batch_key()`:
requests that can share one canvas). When the worker is free, the group holding the oldest waiting request
runs next, as soon as it has `max_batch_size` requests or its oldest request has waited `max_wait_ms`; other
groups wait their turn (queued, never refused, up to `max_queue_size` waiting requests in all). A batch also
holds at most `max_num_batched_tokens` canvas columns (prompt + canvas, twice that with cfg_scale, summed over
its rows); `check_size` refuses a request that alone is over it, or over `max_model_len`.

Isolation: a batch that fails (the engine raised) is decoded again one request at a time, so only the faulty
request fails. Every request carries a seed (serving_common.py gives one to requests without), so the replay
reproduces what the batch already streamed; those events are skipped and the rest follows.

Shutdown: `drain(timeout_s)` (on SIGTERM/SIGINT) refuses new requests with 503 and lets the queued and running
ones finish; past `timeout_s` it ends each of them with a 503 `ApiError` (the stream then sends its error event
and `[DONE]`) and abandons the running batch at its next step.
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
    def __init__(self, llm, *, max_batch_size: int = 32, max_wait_ms: float = 10.0, max_queue_size: int = 256,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue_size", max_queue_size),
                            ("max_model_len", max_model_len), ("max_num_batched_tokens", max_num_batched_tokens)):
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
        self.metrics = ServerMetrics(lambda: self.num_waiting, lambda: self.num_running)
        self._engines = {(llm.engine.cache_name, llm.engine.strategy_name): llm.engine}
        self._waiting: dict[tuple, collections.deque[_Item]] = {}
        self._running: dict[str, _Item] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False   # the worker abandons its batch at the next step
        self._draining = False  # no new requests

    @property
    def num_waiting(self) -> int:
        return sum(len(group) for group in self._waiting.values())

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def is_ready(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing and not self._draining

    @staticmethod
    def columns(request: Request) -> int:
        """The canvas columns `request` takes in a batch: prompt + canvas, twice with classifier-free guidance."""
        n = len(request.prompt_token_ids) + request.params.max_tokens
        return n * (2 if request.params.cfg_scale > 0 else 1)

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
                strategy_options=default.strategy_options if key[1] == default.strategy_name else None)
        return self._engines[key]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._schedule(), name="dllm-scheduler")

    def submit(self, requests: list[tuple[Engine, Request]]) -> RequestHandle:
        if not self.is_ready:
            if self._task is not None and self._task.done() and not self._closing and not self._draining:
                raise ApiError("the engine's batch scheduler stopped after an error (see the server log); restart "
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
            self._waiting.setdefault(item.key, collections.deque()).append(item)
        self._wakeup.set()
        return handle

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests (503) and give the queued and running ones `timeout_s` seconds to finish; then
        end each of them with a 503 error. True when everything finished in time."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while (self._waiting or self._running) and time.monotonic() < deadline and not self._closing:
            await asyncio.sleep(0.05)
        clean = not (self._waiting or self._running)
        if not clean:
            logger.warning("%d requests still in flight after the %g s shutdown timeout; answering them 503",
                           self.num_waiting + self.num_running, timeout_s)
        self.abort_all()
        return clean

    def abort_all(self) -> None:
        """End every queued and running request with a 503 `ServerClosingError`; the worker abandons its batch
        at the next step."""
        self._closing = True
        for item in [*(i for group in self._waiting.values() for i in group), *self._running.values()]:
            if not item.cancelled and not item.done:
                item.cancelled, item.cancel_reason = True, "abort"
                item.handle._put(ServerClosingError())
        self._waiting.clear()
        if self._wakeup is not None:
            self._wakeup.set()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Refuse new requests, fail the waiting and running ones with 503, abandon the running batch at its
        next step, and wait up to `timeout_s` for the worker to notice."""
        self.abort_all()
        if self._task is not None:
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
                errors = await loop.run_in_executor(self._executor, self._run_batch, batch)
                self._end_batch(batch, errors)
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
        batch = [group.popleft()]
        columns = self.columns(batch[0].request)
        while group and len(batch) < self.max_batch_size:
            need = self.columns(group[0].request)
            if columns + need > self.max_num_batched_tokens:
                break
            columns += need
            batch.append(group.popleft())
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

    def _run_batch(self, batch: list[_Item]) -> dict[str, ApiError]:
        """Worker thread: decode one batch, handing every event to the loop; if it fails, decode its unfinished
        requests again one at a time, so that only a faulty request fails. Returns the error of each request
        that failed."""
        delivered: dict[str, int] = {}
        finished: set[str] = set()
        error = self._decode(batch, delivered, finished)
        if error is None:
            return {}
        pending = [i for i in batch if i.request.request_id not in finished and not i.cancelled]
        if len(batch) == 1 or self._closing:
            return {i.request.request_id: error for i in pending}
        logger.warning("a batch of %d requests failed; decoding its %d unfinished requests one at a time",
                       len(batch), len(pending))
        errors = {}
        for item in pending:
            if self._closing:   # abort_all has answered every running request already
                break
            if not item.cancelled:
                alone = self._decode([item], delivered, finished)
                if alone is not None:
                    errors[item.request.request_id] = alone
        return errors

    def _decode(self, batch: list[_Item], delivered: dict[str, int], finished: set[str]) -> ApiError | None:
        """Decode `batch`, handing its events to the loop, except each request's first `delivered[id]` ones (a
        replay: the same seed gives the same events); returns the error that ended it."""
        skip = {i.request.request_id: delivered.get(i.request.request_id, 0) for i in batch}
        events = iter(())
        try:
            events = batch[0].engine.run([item.request for item in batch])
            for event in events:
                rid = event.request_id
                if skip.get(rid, 0) > 0:
                    skip[rid] -= 1
                    if event.output is None:
                        continue
                    event = dataclasses.replace(event, delta_text="", delta_token_ids=[])  # never drop the end
                delivered[rid] = delivered.get(rid, 0) + 1
                self._loop.call_soon_threadsafe(self._deliver, event)
                if event.output is not None:
                    finished.add(rid)
                if self._closing or all(i.cancelled or i.request.request_id in finished for i in batch):
                    break
        except DllmError as exc:
            return ApiError(str(exc))
        except Exception as exc:  # a bug, a device failure or a request the checks let through
            logger.error("decoding a batch of %d requests failed: %s: %r", len(batch), type(exc).__name__,
                         str(exc)[:500], exc_info=logger.isEnabledFor(logging.DEBUG))
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

    def _end_batch(self, batch: list[_Item], errors: dict[str, ApiError]) -> None:
        for item in batch:
            self._running.pop(item.request.request_id, None)
            if item.cancelled and not item.done:
                self.metrics.requests_finished.inc(1, item.cancel_reason)
            elif not item.done:
                item.handle._put(errors.get(item.request.request_id) or (
                    ServerClosingError() if self._closing else EngineFailedError(
                        RuntimeError("the batch ended without an output for this request"))))

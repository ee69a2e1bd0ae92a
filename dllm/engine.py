"""The engine: the one denoising loop, batched over rows with their own prompt lengths, seeds and stop state.

For each block, left to right, until no row has a MASK left in it:
    plan   = cache.plan(block, step)                 which slice to compute, which K/V to reuse
    logits = model(canvas[plan], plan)               logits for the block's positions only
    x0, commit = strategy.step(logits, masked)       which masked positions become final, with which tokens
    canvas[block] = where(commit, x0, canvas[block])
A row stops as soon as a stop token is committed with nothing masked before it; it leaves the batch and its
output is final (every later position could only follow the stop token). Text becomes final left to right,
and each step yields the newly final text of every row as `StreamEvent`s.

The engine knows no model family, strategy or cache by name: it drives the three interfaces. Per step it makes
one device-to-host transfer (row status, with the generation regions when streaming), which the
block-completion test needs anyway; the step scheduler makes one such transfer for all its cohorts.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from dllm.cache import cache_class, make_cache
from dllm.decoding import strategy_class
from dllm.decoding.base import StepEdits
from dllm.canvas import Canvas
from dllm.errors import InvalidParameterError
from dllm.models.loader import LoadedModel
from dllm.runner import ModelRunner
from dllm.step_context import StepContext
from dllm.outputs import CompletionOutput, RequestMetrics, RequestOutput, StreamEvent
from dllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # resolved (every field set)
    prompt: str | None = None
    arrival: float | None = None  # perf_counter() when it was queued (a scheduler's); latency counts from there


@dataclass
class _Row:
    """Running state of one request inside a batch."""

    request: Request
    generator: torch.Generator | None
    nfe: int = 0
    emitted_tokens: int = 0
    emitted_text: str = ""
    token_ids: list[int] = field(default_factory=list)


class Engine:
    def __init__(self, loaded: LoadedModel, cache: str = "none", strategy: str = "reference",
                 cache_options: dict | None = None, strategy_options: dict | None = None,
                 enforce_eager: bool = False, runner: ModelRunner | None = None):
        self.loaded, self.cache_name, self.strategy_name = loaded, cache, strategy
        self.model, self.spec, self.tokenizer = loaded.model, loaded.spec, loaded.tokenizer
        cache_class(cache).check(self.spec)  # refuse unknown or unsuitable choices now, not at the first request
        self.cache_options = cache_class(cache).resolve_options(dict(cache_options or {}))
        self.strategy_cls = strategy_class(strategy, self.spec.family)
        self.strategy_options = dict(strategy_options or {})
        self.strategy_state = self.strategy_cls.prepare(self.strategy_options, loaded)
        _check_pairing(self.strategy_cls, cache_class(cache), self.spec)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        # engines that never run at the same time (the server's, one per cache and strategy) share one runner
        self.runner = runner or ModelRunner.shared(loaded.model, loaded.arch, enforce_eager=enforce_eager)
        if self.runner.group is not None and not cache_class(cache).tensor_parallel:
            raise InvalidParameterError(f"cache '{cache}' compares attention across all heads, which tensor "
                                        "parallelism splits over processes; use another cache or "
                                        "tensor_parallel_size=1")

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """Check `params` against the strategy and the model, and fill the checkpoint's defaults."""
        params = self.strategy_cls.request_defaults(params, self.strategy_state)
        self.strategy_cls.validate(params, self.spec)
        return params.resolve(self.spec.defaults, steps_mode=self.strategy_cls.steps_mode,
                              divisible=self.spec.attention == "full")

    def check_request(self, request: Request) -> None:
        n, limit = len(request.prompt_token_ids), self.spec.max_length
        if n == 0:
            raise InvalidParameterError("the prompt is empty; give at least one token of prompt")
        if n + request.params.max_tokens > limit:
            raise InvalidParameterError(
                f"prompt of {n} tokens plus max_tokens {request.params.max_tokens} exceeds the model's context of "
                f"{limit} tokens; shorten the prompt or lower max_tokens")
        vocab = self.loaded.arch.vocab_size
        if any(not 0 <= t < vocab for t in request.params.stop_token_ids):
            raise InvalidParameterError(f"stop_token_ids must be token ids in [0, {vocab}), the model's vocabulary")
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise InvalidParameterError(f"prompt token ids must be in [0, {vocab}), the model's vocabulary")
        if request.params.cfg_scale > 0 and self.spec.attention != "full":
            raise InvalidParameterError("cfg_scale needs a model with full attention; set cfg_scale=0")
        if request.params.cfg_scale > 0 and not cache_class(self.cache_name).supports_cfg:
            raise InvalidParameterError(f"cache '{self.cache_name}' does not support cfg_scale; set cfg_scale=0 "
                                        "or use cache none, prefix or dual")

    def run(self, requests: list[Request], stream: bool = True) -> Iterator[StreamEvent]:
        """Decode `requests` (same batch key) together, yielding newly final text after every step (`stream`)
        or only each request's final event (no per-step detokenization)."""
        params = requests[0].params
        if any(r.params.batch_key() != params.batch_key() for r in requests):
            raise InvalidParameterError("requests in one engine batch must share their decoding settings")
        for r in requests:
            self.check_request(r)
        with torch.no_grad():
            yield from self.open_run(requests, stream).events()

    def open_run(self, requests: list[Request], stream: bool = True, pool_rows: int = 0):
        """Start decoding `requests` (same batch key, checked): the canvas loop, or the strategy's own loop when
        it declares one (TiDAR's draft-verify-predraft loop, `decoding/tidar_run.py`); both have events / drop /
        close (the step scheduler starts its cohorts here)."""
        run_class = getattr(self.strategy_cls, "run_class", None)
        return (run_class() if run_class else _Run)(self, requests, stream, pool_rows=pool_rows)



class _Run:
    """One decoding run over a batch; owns the canvas, the cache policy and the strategy state."""

    def __init__(self, engine: Engine, requests: list[Request], stream: bool = True, pool_rows: int = 0):
        self.engine, self.spec, self.stream = engine, engine.spec, stream
        self.closed = False
        self.params = p = requests[0].params
        self.canvas = Canvas([r.prompt_token_ids for r in requests], p.max_tokens, p.block_length, self.spec,
                             engine.device)
        self.rows = [_Row(r, _generator(r.params.seed, engine.device)) for r in requests]
        self.strategy = engine.strategy_cls(p, self.spec)
        self.strategy.state, self.strategy.canvas = engine.strategy_state, self.canvas
        self.strategy.ctx = self.ctx = StepContext(self)
        self.mask_fn = self.strategy.attention(self.canvas.attn_mask)   # what every forward is planned with
        self.cache = make_cache(engine.cache_name, engine.cache_options)
        # "tail" (Learn2PD's end-of-text scope): the rest of the canvas too, when the cache computes it
        span = self.strategy.logits_span
        self.span = "block" if span == "tail" and not self.cache.feeds_all else span
        self.cfg = p.cfg_scale > 0
        batch = len(requests) * (2 if self.cfg else 1)
        self.cache.extra_columns = self.strategy.scratch_width(p.block_length)
        # + 1: the scratch column of gathered plans
        # (pool_rows: the step scheduler sizes the pool for all its slots when the first cohort starts)
        engine.runner.prepare(max(batch, pool_rows), self.canvas.length + self.cache.extra_columns + 1)
        self.cache.kv_source = engine.runner.kv_buffers
        self._logit_slots: dict[tuple, torch.Tensor] = {}
        self.cache.allocate(batch, self.canvas.length, engine.loaded.arch, self.spec, engine.dtype, engine.device)
        self.num_layers = engine.loaded.arch.num_layers
        self.kv_steps: list[torch.Tensor] = []   # [steps, rows] chunks: token x layer K/V computed per step
        self.remasked = torch.zeros(len(requests), dtype=torch.long, device=engine.device)
        stops = sorted(set(() if p.ignore_eos else self.spec.stop_ids) | set(p.stop_token_ids))
        self.stop_ids = torch.tensor(stops, dtype=torch.long, device=engine.device)
        self.cache.attach(self.canvas, self.stop_ids, p)
        self.start_time = time.perf_counter()

    def events(self, marks: bool = False, forwards: bool = False) -> Iterator[StreamEvent | None | ForwardCall]:
        """The run's StreamEvents, step by step; with `marks`, a None after every step (the step scheduler runs
        one step of each cohort at a time); with `forwards`, each step's model forward is handed out as a
        `ForwardCall` whose logits the caller sends back (`generator.send(logits)`), so that the step scheduler
        can run the forwards of several runs as one, and each step's row status as a `StatusRead` whose host
        values the caller sends back (`StatusRead.fetch_all`), so that it can bring several runs' to the host
        in one transfer. The run's K/V slots are given back when it ends or is closed."""
        try:
            if forwards:
                yield from self._events(marks)
                return
            gen = self._events(marks)
            item = next(gen, _END)
            while item is not _END:
                if isinstance(item, ForwardCall):
                    item = _send(gen, self.engine.runner.forward(*item.args))
                elif isinstance(item, StatusRead):
                    item = _send(gen, item.fetch())
                else:
                    yield item
                    item = next(gen, _END)
        finally:
            self.close()

    def close(self) -> None:
        """Give the run's K/V slots back to the runner (once)."""
        if not self.closed:
            self.closed = True
            self.engine.runner.release(self.cache.buffers)

    def drop(self, request_ids: set[str]) -> None:
        """Rows of these requests leave the run now (cancelled); the rest decode on unchanged."""
        keep = [i for i, row in enumerate(self.rows) if row.request.request_id not in request_ids]
        if len(keep) < len(self.rows):
            self._select_rows(keep)

    def _events(self, marks: bool) -> Iterator[StreamEvent | None]:
        canvas = self.canvas
        for b in range(canvas.num_blocks):
            start, end = canvas.block(b)
            self.strategy.block_start = start
            self.strategy.begin_block(canvas.tokens[:, start:end] == self.spec.mask_id)
            limit = self.strategy.max_forwards(canvas.block_length)
            for step in range(limit + 1):
                if step == limit:
                    raise RuntimeError(f"strategy {self.strategy.name!r} made no progress in block {b}")
                yield from self._step(start, end, step)
                first_mask, first_stop, region = yield self._status_read()
                block_done = canvas.block_done(first_mask, end)
                yield from self._emit(b, first_mask, first_stop, region)
                if not self.rows:
                    return
                if marks:
                    yield None
                if block_done:
                    break
        yield from self._emit(canvas.num_blocks - 1, *(yield self._status_read()), final=True)

    def _status_read(self) -> "StatusRead":
        """This step's row status for the host, with every row's generation region when streaming (the rows
        whose final text grew are known only from the status)."""
        return StatusRead(self.canvas.status_tensor(self.stop_ids), self.canvas.region() if self.stream else None)

    def _step(self, start: int, end: int, step: int) -> None:
        c = self.canvas
        lo = c.gen_start if self.span == "generation" else start
        hi = c.length if self.span == "tail" else end
        span = c.tokens[:, lo:hi]
        masked = span == self.spec.mask_id
        alive = c.alive(lo, hi)
        if alive is not None:
            masked &= alive
        logits, plan = yield from self._forward(start, end, step, lo, hi)
        choosable = masked if plan.commit_mask is None else masked & plan.commit_mask
        edits = self.strategy.step(logits, choosable, [r.generator for r in self.rows], plan.first_only)
        if not isinstance(edits, StepEdits):
            edits = StepEdits(*edits)
        new = torch.where(edits.commit & choosable, edits.x0, span)
        if edits.remask is not None:
            remask = edits.remask & (new != self.spec.mask_id)
            remask[:, :max(0, c.gen_start - lo)] = False          # never the prompt
            new = new.masked_fill(remask, self.spec.mask_id)
            full = torch.zeros_like(c.tokens, dtype=torch.bool)
            full[:, lo:end] = remask
            self.cache.on_remask(full)
            self.remasked += remask.sum(1)
        c.tokens[:, lo:hi] = new
        if edits.truncate is not None:
            c.truncate(edits.truncate)
            self.cache.on_truncate()
        extra, extra_kv = self.ctx.take()          # per row: forwards the strategy made for it
        if extra is not None:
            self.kv_steps[-1] = self.kv_steps[-1] + extra_kv
        for i, row in enumerate(self.rows):
            row.nfe += 1 + (extra[i] if extra is not None else 0)

    def _forward(self, start: int, end: int, step: int, lo: int, hi: int):
        """Logits [B, hi - lo, V] for columns [lo, hi) (the block, every generated column up to its end, or the
        block and the rest of the canvas, as the strategy reads them), through the cache policy (and CFG)."""
        c = self.canvas
        tokens, positions, mask = c.tokens, c.positions, self.mask_fn
        if self.cfg:  # unconditional rows: the same canvas with the prompt (and padding) masked
            uncond = tokens.clone()
            uncond[:, :c.gen_start] = self.spec.mask_id
            tokens, positions = torch.cat([tokens, uncond]), torch.cat([positions, positions])
            mask = _doubled(self.mask_fn)
        plan = self.cache.plan(start, end, step, mask)
        if plan.index is not None:  # the policy names the fed columns per row and where each block logit comes from
            ids, pos, logits_index = tokens.gather(1, plan.index), positions.gather(1, plan.index), plan.logits_index
        else:
            ids, pos = tokens[:, plan.start:plan.end], positions[:, plan.start:plan.end]
            logits_index = self._slice_logits(lo, hi, plan.start, ids.shape[0])
        logits = yield ForwardCall(ids, pos, plan, logits_index)   # the runner's forward (events() runs it)
        fed = ids.shape[1]
        done = plan.kv_computations if plan.kv_computations is not None else fed * self.num_layers
        rows = len(self.rows)
        self.kv_steps.append(done[None, :rows] if torch.is_tensor(done) else
                             torch.full((1, rows), done, dtype=torch.long, device=self.engine.device))
        if self.cfg:
            cond, uncond = logits.chunk(2)
            logits = uncond + (self.params.cfg_scale + 1) * (cond - uncond)
        return logits, plan

    def _slice_logits(self, start: int, end: int, fed_start: int, rows: int) -> torch.Tensor:
        """For a forward fed canvas[:, fed_start:...], the fed slot each block column's logits come from.

        Shifted logits (Dream): position i is read from hidden state i - 1. When the plan does not feed i - 1 for
        the block's first position, that position reads its own logits, as Fast-dLLM's cached Dream path does
        (the position is committed at the block start, so the value is never used)."""
        key = (start, end, fed_start, rows)
        if key not in self._logit_slots:
            shift = int(self.spec.shift_logits)
            cols = torch.arange(start - shift, end - shift, device=self.engine.device).clamp(min=fed_start)
            self._logit_slots[key] = (cols - fed_start).expand(rows, -1)
        return self._logit_slots[key]

    def _emit(self, block: int, first_mask: list[int], first_stop: list[int], region: list[list[int]] | None,
              final: bool = False):
        """Yield newly final text per row (every row with new final tokens when streaming, else only finished
        rows); finish rows whose stop token is final or whose region is full. `region`: the canvas's `region()`
        on the host, if the status read brought it."""
        done, updates = [], []
        sizes = self.canvas.sizes()
        limits = self.strategy.final_limit()
        for i, row in enumerate(self.rows):
            size = sizes[i]
            complete = first_mask[i] >= size                     # nothing masked: everything is final
            limit = first_mask[i] if limits is None or complete else \
                min(first_mask[i], max(0, limits[i] - self.canvas.gen_start_cols[i]))
            stopped = first_stop[i] < limit
            final_len = first_stop[i] + 1 if stopped else min(limit, size)
            finished = stopped or final or complete
            if finished or (self.stream and final_len > row.emitted_tokens):
                updates.append((i, final_len, stopped, finished))
            if finished:
                done.append(i)
        if updates:
            generated = self.canvas.generated([i for i, *_ in updates], region)
            for (i, final_len, stopped, finished), ids in zip(updates, generated):
                row = self.rows[i]
                row.token_ids = ids[:final_len]
                yield self._event(row, block, stopped, finished)
        if done:
            self._select_rows([i for i in range(len(self.rows)) if i not in done])

    def _event(self, row: _Row, block: int, stopped: bool, finished: bool) -> StreamEvent:
        tok = self.engine.tokenizer
        ids = row.token_ids[:-1] if stopped else row.token_ids
        text = "" if tok is None else tok.decode(ids, skip_special_tokens=row.request.params.skip_special_tokens)
        if not finished and text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            text = text.rstrip("\ufffd")
        delta_ids = row.token_ids[row.emitted_tokens:]
        delta_text = text[len(row.emitted_text):] if text.startswith(row.emitted_text) else text
        row.emitted_tokens, row.emitted_text = len(row.token_ids), text
        output = self._output(row, text, "stop" if stopped else "length") if finished else None
        return StreamEvent(row.request.request_id, delta_text, delta_ids, block, self.canvas.num_blocks, output)

    def _output(self, row: _Row, text: str, reason: str) -> RequestOutput:
        latency = time.perf_counter() - (row.request.arrival or self.start_time)
        index = self.rows.index(row)
        per_step = torch.cat(self.kv_steps)[:, index].tolist()
        kv, full = sum(per_step), row.nfe * self.canvas.length * self.num_layers
        metrics = RequestMetrics(nfe=row.nfe, num_tokens=len(row.token_ids), latency_s=latency,
                                 kv_computations=kv, kv_fraction=kv / full if full else 0.0,
                                 kv_computations_per_step=per_step, cache_stats=self.cache.row_stats(index),
                                 num_remasked=int(self.remasked[index]),
                                 strategy_stats=self.strategy.row_stats(index))
        r = row.request
        return RequestOutput(r.request_id, r.prompt, list(r.prompt_token_ids),
                             [CompletionOutput(0, text, list(row.token_ids), reason)], metrics)

    def _select_rows(self, keep: list[int]) -> None:
        batch = len(self.rows)
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.engine.device)
        self.kv_steps = [torch.cat(self.kv_steps)[:, idx]]
        self.remasked = self.remasked[idx]
        self.canvas.select_rows(idx)
        self.strategy.select_rows(idx)
        self.cache.select_rows(torch.cat([idx, idx + batch]) if self.cfg else idx)


@dataclass(eq=False)
class ForwardCall:
    """One step's model forward of a run, as `ModelRunner.forward` takes it."""

    ids: torch.Tensor
    positions: torch.Tensor
    plan: object
    logits_index: torch.Tensor

    @property
    def args(self) -> tuple:
        return self.ids, self.positions, self.plan, self.logits_index


@dataclass
class StatusRead:
    """One step's row status of a run, on the device: `status` [2, B] (`Canvas.status_tensor`) and, when
    streaming, `region` [B, W] (`Canvas.region`). The run is sent back (first_mask, first_stop, region rows or
    None) as host lists."""

    status: torch.Tensor
    region: torch.Tensor | None

    def fetch(self) -> tuple[list[int], list[int], list[list[int]] | None]:
        return StatusRead.fetch_all([self])[0]

    @staticmethod
    def fetch_all(reads: list["StatusRead"]) -> list[tuple[list[int], list[int], list[list[int]] | None]]:
        """The host values of several runs' reads, in one device-to-host transfer."""
        parts = [t for r in reads for t in (r.status, r.region) if t is not None]
        flat = torch.cat([t.reshape(-1).long() for t in parts]).tolist()
        out, at = [], 0
        for r in reads:
            rows = r.status.shape[1]
            first_mask, first_stop = flat[at:at + rows], flat[at + rows:at + 2 * rows]
            at += 2 * rows
            region = None
            if r.region is not None:
                width = r.region.shape[1]
                region = [flat[at + i * width:at + (i + 1) * width] for i in range(rows)]
                at += rows * width
            out.append((first_mask, first_stop, region))
        return out


_END = object()


def _send(gen, value):
    try:
        return gen.send(value)
    except StopIteration:
        return _END


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _doubled(mask_fn):
    """The canvas's mask function for a CFG batch (conditional rows, then the same rows unconditional)."""
    def mask(*args):
        m = mask_fn(*args)
        return None if m is None else torch.cat([m, m])
    return mask


def _check_pairing(strategy, cache, spec) -> None:
    """Refuse a strategy x cache pair that cannot work, at engine construction."""
    if strategy.logits_span == "generation" and not cache.feeds_all:
        raise InvalidParameterError(f"strategy '{strategy.name}' reads the logits of every generated position; "
                                    f"cache '{cache.name}' does not compute them: use cache none")
    if strategy.logits_span == "generation" and spec.attention != "full":
        raise InvalidParameterError(f"strategy '{strategy.name}' needs a full-attention model (LLaDA, Dream)")
    if strategy.caches is not None and cache.name not in strategy.caches:
        raise InvalidParameterError(f"strategy '{strategy.name}' works with cache {', '.join(strategy.caches)}; "
                                    f"cache '{cache.name}' is not one of them")
    if strategy.remasks and not cache.supports_remask:
        raise InvalidParameterError(f"strategy '{strategy.name}' re-masks committed tokens, which cache "
                                    f"'{cache.name}' does not support; use cache none, prefix or dual")

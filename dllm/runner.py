"""The model runner: owns the model (fused for inference), the K/V storage, the rotary table and the CUDA graphs,
and runs one forward for the engine.

What it knows: shapes, buffers and graphs. What it must not know: who runs (the engine decides), which K/V to
reuse (the cache policy's plan says), which tokens to commit (the strategy). The engine hands it the fed tokens
and positions, the policy's plan and the fed slot each block logit is read from; it returns the logits.

Every forward of a graph-friendly plan (a `ForwardPlan` over a slice, an `IndexedPlan` over gathered columns) is
run in one canonical form: the fed tokens' K/V are scattered into the K/V buffers at per-row columns (a device
tensor, so the block's position is not baked into the graph), every layer attends to the whole buffer, and the
plan's key range and mask become one boolean mask over it (none at all when every key is visible: the flash
path). So a shape (batch bucket, fed width, buffer length, mask shape, logit count) names one graph, reused by
every block and by every run of the same canvas length. Plans with per-layer hooks (Elastic-Cache) run eagerly.

Graphs are captured lazily, on the second forward of a shape (the first runs eagerly and warms the kernels up;
a shape seen once is never captured). On CUDA a batch is padded to its bucket (1, 2, 4, 8, ...) on both paths,
so the eager path (`enforce_eager=True`) runs exactly the kernels a graph replays. The CPU always runs eagerly and
unpadded.

K/V storage is one pool per runner: per layer [slots, Hkv, max_len, D], allocated on the first run and grown (by
reallocation, which drops the graphs) when a run needs more rows or columns while no other run holds slots; runs
take views of a contiguous range of its slots (from an offset, part of a graph's key), so the graphs' addresses
stay valid from run to run and runs decoding side by side (the step scheduler's cohorts) never share rows. A run
that finds no free range big enough gets storage of its own and runs eagerly; `release` gives its slots back.
Logits returned by a graph live in its static output: they are valid until the next forward.

`forward_merged` runs the same-shape forwards of several runs (the step scheduler's cohorts) as one model call,
and every row is computed as its own run's forward would compute it. On CUDA the merged call is itself a canonical
forward, graphed like any other (`_merge_pool`): one batch over the pool's rows [0, S), each run's rows at its own
slots (its K/V stay where they are), every other row a filler that writes and reads only the pool's last column,
which the runner never hands to a run; S is the bucket of the highest slot in use, so the graph's key does not
depend on which runs take part. Forwards without K/V buffers are stacked (`_merge_rows`). The CPU merges eagerly
with attention per run over its own K/V (`_MergedPlan`; tests switch the pool form on with `merge_in_pool`).
Nothing is merged under tensor parallelism, for plans that hook every layer, across runners, or for runs with
storage of their own on CUDA. A merged row attends under a mask over the pool's full length, where alone a forward
whose keys are all visible takes the unmasked (flash) kernel: the same attention, but not the same bf16 rounding,
so in bf16 a request's tokens may differ from decoding it alone (float32 tokens do not: tests/test_scheduler.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

import torch.distributed as dist

from dllm import ops
from dllm.attention import attend, prepare_mask
from dllm.distributed import FORWARD, PREPARE, SELECT, DistributedError
from dllm.kv import KVBuffers, KVPool
from dllm.models.core import Transformer
from dllm.models.spec import ArchConfig

logger = logging.getLogger(__name__)

_LENGTH_GRAIN = 256      # pool columns are allocated in multiples of this
# A forward reads every weight once, which takes about as long as computing this many fed tokens on a GPU such as
# the H200 (bf16: ~990 TFLOP/s over ~4.8 TB/s is ~200 FLOP a byte; a token costs 2 FLOP a parameter, reading it 2
# bytes): a merged forward's filler rows (fed tokens computed for nothing) are worth it while they are fewer than
# this many tokens for every call the merge saves.
_CALL_TOKENS = 256
DEFAULT_MAX_GRAPHS = 64


def batch_bucket(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())


def span_bucket(n: int) -> int:
    """The pool rows a merged forward over the pool's first n rows computes: a power of two up to 8, then four
    steps an octave (12, 16, 24, 32, 48, 64, ...). Finer than `batch_bucket`, because every row between the
    merged runs' rows is a filler computed for nothing (a few more graphs against up to a third fewer rows)."""
    top = batch_bucket(n)
    if top <= 8:
        return top
    step = top // 4
    return -(-n // step) * step


class _StepPlan:
    """The canonical attention plan of a runner forward: scatter the fed K/V at `write` [B, W] (None: no
    buffers, attend to the fed tokens themselves) and attend to the buffers under `attn_mask` (None: all; made
    once a forward by `ModelRunner._plan` in the form `attention.prepare_mask` gives, not by every layer)."""

    def __init__(self, write: torch.Tensor | None, attn_mask: torch.Tensor | None, buffers: KVBuffers | None):
        self.write, self.attn_mask, self.buffers = write, attn_mask, buffers

    def store(self, layer: int):
        return None if self.write is None else (self.buffers.k[layer], self.buffers.v[layer], self.write)

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.write is None:
            return k, v
        kb, vb = self.buffers.k[layer], self.buffers.v[layer]
        ops.store_kv(kb, vb, self.write, k, v)
        return kb, vb


class _MergedPlan:
    """The attention of a merged forward: rows [start, start + n) of the batch are one run's, attending under
    that run's `_StepPlan` (its own K/V storage and mask)."""

    def __init__(self, parts: list[tuple[_StepPlan, int]]):
        self.parts = parts

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for plan, n in self.parts:
            kb, vb = plan.kv(layer, k[start:start + n], v[start:start + n])
            outs.append(attend(q[start:start + n], kb, vb, plan.attn_mask))
            start += n
        return torch.cat(outs)


@dataclass
class _Inputs:
    """One forward in canonical form, rows padded to `batch` (the bucket)."""

    ids: torch.Tensor            # [B, W]
    positions: torch.Tensor      # [B, W]
    logits_index: torch.Tensor   # [B, Lq]
    write: torch.Tensor | None   # [B, W]
    mask: torch.Tensor | None    # [B, 1, W|1, K]
    buffers: KVBuffers | None    # views of [B] rows

    def key(self) -> tuple:
        return (tuple(self.ids.shape), self.logits_index.shape[1], self.write is not None,
                None if self.mask is None else tuple(self.mask.shape),
                None if self.buffers is None else (tuple(self.buffers.k[0].shape), self.buffers.offset))


class _Graph:
    """A captured forward with its static inputs and output."""

    def __init__(self, runner: "ModelRunner", inputs: _Inputs):
        self.static = _Inputs(inputs.ids.clone(), inputs.positions.clone(), inputs.logits_index.clone(),
                              None if inputs.write is None else inputs.write.clone(),
                              None if inputs.mask is None else inputs.mask.clone(), inputs.buffers)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner.graph_pool):
            self.out = runner.run_eager(self.static)

    def replay(self, inputs: _Inputs) -> torch.Tensor:
        s = self.static
        s.ids.copy_(inputs.ids)
        s.positions.copy_(inputs.positions)
        s.logits_index.copy_(inputs.logits_index)
        if s.write is not None:
            s.write.copy_(inputs.write)
        if s.mask is not None:
            s.mask.copy_(inputs.mask)
        self.graph.replay()
        return self.out


class ModelRunner:
    def __init__(self, model: Transformer, arch: ArchConfig, enforce_eager: bool = False,
                 max_graphs: int = DEFAULT_MAX_GRAPHS, group=None):
        self.model = model.fuse()
        self.group = group          # rank 0's TPGroup under tensor parallelism (None: one process)
        attn = model.layers[0].attn
        # this rank's shape (its own heads under tensor parallelism): what its K/V pool holds
        self.arch = dataclasses.replace(arch, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.on_cuda = self.device.type == "cuda"
        self.use_graphs = self.on_cuda and not enforce_eager
        # fed widths over cached K/V are padded to `width_bucket` on CUDA (both paths, as batches are padded to
        # their bucket); the CPU runs them as they come (tests switch it on to check the padding changes nothing)
        self.pad_widths = self.on_cuda
        # batches padded to their bucket and pool ranges bucket-sized (CUDA; tests switch it on for the CPU)
        self.pad_rows = self.on_cuda
        # merged forwards as one canonical forward over the pool's rows (graphable) rather than per-run attention
        self.merge_in_pool = self.on_cuda
        self.pool: KVPool | None = None
        self.taken: dict[int, int] = {}   # pool slots held by unfinished runs: offset -> slots
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.seen: dict[tuple, int] = {}
        self.max_graphs = max_graphs
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_seconds = 0.0
        self.merged_calls = 0   # model calls the last forward_merged made
        self.num_captures = 0

    @classmethod
    def shared(cls, model: Transformer, arch: ArchConfig, enforce_eager: bool = False) -> "ModelRunner":
        """The runner of `model` (one per model and eager setting): engines over one model that never run at the
        same time (the server's, one per cache and strategy) share its storage and graphs."""
        runners = model.__dict__.setdefault("_dllm_runners", {})   # dies with the model
        if enforce_eager not in runners:
            runners[enforce_eager] = cls(model, arch, enforce_eager=enforce_eager)
        return runners[enforce_eager]

    # ------------------------------------------------------------------ storage

    def prepare(self, rows: int, length: int) -> None:
        """Make room for a run of `rows` rows over `length` columns (K/V pool and rotary table)."""
        if self.group is not None:
            self.group.post(PREPARE, rows, length)
        slots = batch_bucket(rows) if self.pad_rows else rows
        # while other runs hold views of the pool it cannot move (kv_buffers then finds room or allocates)
        # (+ 1: the pool's last column is no run's; merged forwards' filler rows write there)
        if not self.taken and (self.pool is None or self.pool.slots < slots or self.pool.length <= length):
            old = self.pool
            slots = max(slots, old.slots if old else 0)
            cols = max(-(-(length + 1) // _LENGTH_GRAIN) * _LENGTH_GRAIN, old.length if old else 0)
            self.pool = None
            self.clear_graphs()
            self.pool = KVPool(self.arch, slots, cols, self.dtype, self.device)
        need = max(self.pool.length, length)   # a run beside others may outgrow the pool (own storage)
        if self.rope is None or self.rope[0].shape[0] < need:
            self.rope = self.model.rotary.table(need, self.device)

    def kv_buffers(self, rows: int, length: int) -> KVBuffers:
        """K/V storage for a run of `rows` rows over `length` columns (after `prepare`): a view of free pool slots
        (a batch bucket of them on CUDA, so padding rows stay inside), held until `release`; storage of its own
        when the pool has no free range that big. Under tensor parallelism every rank compacts its own shard when
        rows leave."""
        slots = batch_bucket(rows) if self.pad_rows else rows
        offset = self._free_range(slots) if self.pool is not None and self.pool.length > length else None
        if offset is None:
            if self.group is not None:
                raise DistributedError("the K/V pool is held by another run; under tensor parallelism runs decode "
                                       "one at a time")
            logger.debug("no %d free K/V slots of %d columns in the pool: the run gets its own storage", slots, length)
            return KVBuffers.allocate(self.arch, rows, length, self.dtype, self.device)
        self.taken[offset] = slots
        view = self.pool.view(rows, length, offset)
        if self.group is not None:
            view.on_select = self._select_everywhere
        return view

    def release(self, buffers: KVBuffers | None) -> None:
        """A run is over: its pool slots are free for the next one."""
        if buffers is not None and self.pool is not None and self.pool.owns(buffers):
            self.taken.pop(buffers.offset, None)

    def _free_range(self, slots: int) -> int | None:
        """The lowest offset of `slots` consecutive pool slots no run holds (None: none)."""
        start = 0
        for offset, held in sorted(self.taken.items()):
            if offset - start >= slots:
                return start
            start = max(start, offset + held)
        return start if self.pool.slots - start >= slots else None

    def _select_everywhere(self, rows: int, length: int, keep: torch.Tensor) -> None:
        self.group.post(SELECT, rows, length, keep.numel())
        self.group.collective(dist.broadcast, keep.to(torch.long).contiguous(), 0)

    def clear_graphs(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        if self.use_graphs:   # the old pool is released with its last graph: later captures need a new one
            self.graph_pool = torch.cuda.graph_pool_handle()

    def stats(self) -> dict:
        return {"graphs": len(self.graphs), "captures": self.num_captures,
                "capture_seconds": round(self.capture_seconds, 3),
                "kv_pool_bytes": self.pool.nbytes if self.pool else 0,
                "graph_pool_bytes": _pool_bytes(self.graph_pool) if self.graph_pool is not None else 0}

    # ------------------------------------------------------------------ forwards

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, plan, logits_index: torch.Tensor) -> torch.Tensor:
        """ids, positions [B, W] (the fed columns), `plan` the cache policy's, logits_index [B, Lq] (the fed slot
        each returned logit is read from) -> logits [B, Lq, V]."""
        if hasattr(plan, "attention") or hasattr(plan, "layer_input"):
            if self.group is not None:
                raise DistributedError("this cache's plans hook every layer's attention, which needs every "
                                       "head in one process; use tensor_parallel_size=1")
            return self.model(ids, positions, plan, logits_index=logits_index, rope_table=self.rope)
        inputs = self._canonical(ids, positions, plan, logits_index)
        rows = ids.shape[0]
        if self.group is not None:
            send_inputs(self.group, inputs)
        logits = self._run(inputs)
        if self.group is not None:
            logits = gather_logits(self.group, logits)
        return logits[:rows]

    def merge_key(self, ids: torch.Tensor, plan, logits_index: torch.Tensor) -> tuple | None:
        """Forwards (of different runs) with equal keys can run as one `forward_merged`; None: this one runs by
        itself (under tensor parallelism, plans that hook every layer, and in the pool form storage of a run's
        own)."""
        if self.group is not None or hasattr(plan, "attention") or hasattr(plan, "layer_input"):
            return None
        if not self.merge_in_pool:
            return id(self), ids.shape[1], logits_index.shape[1]
        buffers = plan.buffers
        if buffers is not None and not self._graphable(buffers):
            return None
        width = width_bucket(ids.shape[1]) if self.pad_widths and buffers is not None else ids.shape[1]
        return id(self), buffers is None, width, logits_index.shape[1]

    def forward_merged(self, calls: list[tuple]) -> list[torch.Tensor]:
        """Several runs' forwards (`forward`'s arguments each, equal `merge_key`s) as one model call: the
        projections, MLPs and logits batched over all their rows, each row attending to its own run's K/V.
        Returns each call's logits; `merged_calls` says how many model calls that took."""
        self.merged_calls = 1
        if len(calls) == 1:
            return [self.forward(*calls[0])]
        inputs = [self._canonical(*call) for call in calls]
        if self.merge_in_pool:
            return self._forward_in_pool(calls, inputs)
        rows = [i.ids.shape[0] for i in inputs]
        plan = _MergedPlan([(self._plan(i), n) for i, n in zip(inputs, rows)])
        logits = self.model(torch.cat([i.ids for i in inputs]), torch.cat([i.positions for i in inputs]), plan,
                            logits_index=torch.cat([i.logits_index for i in inputs]), rope_table=self.rope)
        return list(logits.split(rows))

    def _forward_in_pool(self, calls: list[tuple], inputs: list[_Inputs]) -> list[torch.Tensor]:
        """The pool form of a merged forward: one canonical forward (graphed on CUDA like any other), unless
        the shapes differ after padding or the pool's rows between the runs' would cost more than the calls
        saved (`_CALL_TOKENS`): then one call each."""
        rows = [call[0].shape[0] for call in calls]
        shapes = {(i.ids.shape[1], i.logits_index.shape[1], i.buffers is None) for i in inputs}
        span = fillers = 0
        if inputs[0].buffers is not None:   # pool rows [0, span): the bucket of the highest slot the runs hold
            span = max(i.buffers.offset + i.ids.shape[0] for i in inputs)
            span = span_bucket(span) if self.pad_rows else span
            fillers = span - sum(i.ids.shape[0] for i in inputs)
        if len(shapes) > 1 or fillers * inputs[0].ids.shape[1] > (len(inputs) - 1) * _CALL_TOKENS:
            self.merged_calls = len(inputs)
            return [self._run(i)[:n] for i, n in zip(inputs, rows)]
        if inputs[0].buffers is None:
            merged, starts = _merge_rows(inputs, rows, self.pad_rows)
        else:
            merged, starts = _merge_pool(self.pool, inputs, span)
        # (a key of its own: a strategy's forward between two runs' commits must not replay this graph's output)
        logits = self._run(merged, merged=True)
        return [logits[s:s + n] for s, n in zip(starts, rows)]

    def _run(self, inputs: _Inputs, merged: bool = False) -> torch.Tensor:
        return self._graphed(inputs, merged) if self.use_graphs else self.run_eager(inputs)

    def serve_command(self, fields: tuple) -> None:
        """A worker rank: carry out one of rank 0's commands (see dllm/distributed.py)."""
        if fields[0] == PREPARE:
            self.prepare(fields[1], fields[2])
        elif fields[0] == SELECT:
            keep = torch.empty(fields[3], dtype=torch.long, device=self.device)
            dist.broadcast(keep, 0)
            self.pool.view(fields[1], fields[2]).select_rows(keep)
        elif fields[0] == FORWARD:
            inputs = receive_inputs(fields, self.pool, self.device)
            logits = self._run(inputs)
            dist.gather(logits.contiguous(), None, dst=0)

    def run_eager(self, inputs: _Inputs) -> torch.Tensor:
        return self.model(inputs.ids, inputs.positions, self._plan(inputs), logits_index=inputs.logits_index,
                          rope_table=self.rope)

    def _plan(self, inputs: _Inputs) -> _StepPlan:
        groups = self.arch.num_heads // self.arch.num_kv_heads   # this rank's heads
        mask = prepare_mask(inputs.mask, groups, inputs.ids.shape[1], self.dtype)
        return _StepPlan(inputs.write, mask, inputs.buffers)

    def _graphable(self, buffers: KVBuffers | None) -> bool:
        """Graphs capture addresses: only the runner's own pool (or no buffers at all) stays put between runs."""
        return buffers is None or (self.pool is not None and self.pool.owns(buffers))

    def _graphed(self, inputs: _Inputs, merged: bool = False) -> torch.Tensor:
        if not self._graphable(inputs.buffers):
            return self.run_eager(inputs)
        key = (*inputs.key(), merged)
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            return graph.replay(inputs)
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] < 2:
            return self.run_eager(inputs)
        t = time.perf_counter()
        try:
            graph = _Graph(self, inputs)
        except RuntimeError as exc:   # a kernel that cannot be captured: this shape stays eager
            logger.warning("cannot capture a CUDA graph for %s (%s); running it eagerly", key, exc)
            self.seen[key] = -(1 << 30)
            return self.run_eager(inputs)
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - t
        self.num_captures += 1
        self.graphs[key] = graph
        if len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        logger.debug("captured a graph for %s", key)
        return graph.replay(inputs)

    # ------------------------------------------------------------------ the canonical form

    def _canonical(self, ids, positions, plan, logits_index) -> _Inputs:
        rows, width = ids.shape
        buffers = plan.buffers
        if buffers is None:                                   # no cache: attend to the fed tokens
            write, mask, length = None, plan.attn_mask, width
        elif plan.index is not None:                          # gathered columns (IndexedPlan)
            write, mask, length = plan.write, plan.attn_mask, buffers.k[0].shape[2]
        else:                                                 # a slice [start, end) reading keys [0, read_end)
            length = buffers.k[0].shape[2]
            cols = torch.arange(plan.start, plan.end, device=ids.device)
            write = cols.expand(rows, -1)
            mask = _pad_keys(plan.attn_mask, plan.read_end, length, rows, ids.device)
        if self.pad_widths and buffers is not None and self._graphable(buffers):
            ids, positions, write, mask = _pad_width(ids, positions, write, mask, width_bucket(width))
        padded = batch_bucket(rows) if self.pad_rows else rows
        if padded != rows and self._graphable(buffers):
            ids, positions, logits_index, write, mask = (_pad_rows(t, padded) for t in
                                                         (ids, positions, logits_index, write, mask))
            if buffers is not None:
                buffers = self.pool.view(padded, length, buffers.offset)
        return _Inputs(ids, positions, logits_index, write, mask, buffers)


def _merge_pool(pool: KVPool, parts: list[_Inputs], rows: int) -> tuple[_Inputs, list[int]]:
    """Canonical forwards over views of `pool` (equal fed and logit widths) -> one over the pool's rows
    [0, rows) and each part's first row. A part's rows sit at its own slots with its keys padded to the pool's
    length (hidden); every other row is a filler whose fed slots write the pool's last column, the only key it
    reads: no run's view holds that column."""
    first = parts[0]
    width, lq, length, dev = first.ids.shape[1], first.logits_index.shape[1], pool.length, first.ids.device
    lm = 1 if all(p.mask is None or p.mask.shape[2] == 1 for p in parts) else width
    ids, positions = first.ids.new_zeros(rows, width), first.positions.new_zeros(rows, width)
    index = first.logits_index.new_zeros(rows, lq)
    write = first.write.new_full((rows, width), length - 1)
    mask = torch.zeros(rows, 1, lm, length, dtype=torch.bool, device=dev)
    mask[..., length - 1] = True
    for p in parts:   # (slice copies on the device: no index tensor to send, no host sync)
        at, cols = slice(p.buffers.offset, p.buffers.offset + p.ids.shape[0]), p.buffers.k[0].shape[2]
        ids[at], positions[at], index[at], write[at] = p.ids, p.positions, p.logits_index, p.write
        mask[at, :, :, :cols] = True if p.mask is None else p.mask
        mask[at, :, :, length - 1] = False
    return _Inputs(ids, positions, index, write, mask, pool.view(rows, length, 0)), [p.buffers.offset for p in parts]


def _merge_rows(parts: list[_Inputs], rows: list[int], bucket: bool) -> tuple[_Inputs, list[int]]:
    """Canonical forwards without K/V buffers (equal widths) -> their real rows stacked, padded to a bucket, and
    each part's first row."""
    total = sum(rows)
    padded = batch_bucket(total) if bucket else total
    mask = None
    if any(p.mask is not None for p in parts):
        lq, lk = max(1 if p.mask is None else p.mask.shape[2] for p in parts), parts[0].ids.shape[1]
        mask = torch.cat([(torch.ones(1, 1, 1, lk, dtype=torch.bool, device=p.ids.device) if p.mask is None
                           else p.mask[:n]).expand(n, 1, lq, lk) for p, n in zip(parts, rows)])
    stacked = [torch.cat([getattr(p, name)[:n] for p, n in zip(parts, rows)])
               for name in ("ids", "positions", "logits_index")]
    ids, positions, index, mask = (_pad_rows(t, padded) for t in (*stacked, mask))
    return _Inputs(ids, positions, index, None, mask, None), [0, *itertools.accumulate(rows[:-1])]


def width_bucket(w: int) -> int:
    """The fed width a forward over cached K/V is padded to: exact up to 16, then a multiple of 32 (a cache
    whose fed width changes block by block or step by step then reuses a few graphs instead of capturing one
    per width)."""
    return w if w <= 16 else -(-w // 32) * 32


def _pad_width(ids, positions, write, mask, width: int):
    """Extend the fed slots to `width` by repeating each row's last slot: the same token at the same position
    under the same mask row computes the same K/V and writes it to the same column again, so nothing a real
    slot reads changes; no logit is read from the copies."""
    extra = width - ids.shape[1]
    if extra <= 0 or mask is not None and mask.shape[2] not in (1, ids.shape[1]):
        return ids, positions, write, mask
    rep = lambda t: torch.cat([t, t[:, -1:].expand(-1, extra)], dim=1)   # noqa: E731
    if mask is not None and mask.shape[2] > 1:
        mask = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, extra, -1)], dim=2)
    return rep(ids), rep(positions), rep(write), mask


def _pad_keys(mask: torch.Tensor | None, read_end: int, length: int, rows: int,
              device: torch.device) -> torch.Tensor | None:
    """A mask over keys [0, read_end) -> one over the whole buffer [0, length), keys past read_end hidden."""
    if mask is None and read_end == length:
        return None
    lq = 1 if mask is None else mask.shape[2]
    full = torch.zeros(rows, 1, lq, length, dtype=torch.bool, device=device)
    full[..., :read_end] = True if mask is None else mask
    return full


def _pad_rows(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Extend dim 0 to `rows` by repeating row 0 (padding rows compute something harmless and are dropped)."""
    if t is None:
        return None
    if t.shape[0] == 1 and t.dim() == 4:   # a mask broadcast over rows stays broadcast
        return t
    extra = t[:1].expand(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra])


def _pool_bytes(pool) -> int:
    """Bytes the CUDA caching allocator holds for a graph memory pool (0 when it cannot tell)."""
    try:
        snapshot = torch.cuda.memory_snapshot()
    except Exception:  # pragma: no cover - allocator introspection is best effort
        return 0
    return sum(seg["total_size"] for seg in snapshot if tuple(seg.get("segment_pool_id", ())) == tuple(pool))


# ---------------------------------------------------------------------- tensor parallelism: one forward's inputs

def send_inputs(group, inputs: _Inputs) -> None:
    """Rank 0: the header (shapes) on the store, then the indices and the mask in two broadcasts."""
    b, w = inputs.ids.shape
    lq = inputs.logits_index.shape[1]
    mask = inputs.mask
    buf = inputs.buffers
    group.post(FORWARD, b, w, lq, int(inputs.write is not None), int(buf is not None),
               buf.k[0].shape[0] if buf is not None else 0, buf.k[0].shape[2] if buf is not None else 0,
               *(mask.shape if mask is not None else (0, 0, 0, 0)))
    parts = [inputs.ids, inputs.positions, inputs.logits_index] + ([inputs.write] if inputs.write is not None else [])
    group.collective(dist.broadcast, torch.cat([t.reshape(-1) for t in parts]).contiguous(), 0)
    if mask is not None:
        group.collective(dist.broadcast, mask.to(torch.uint8).contiguous(), 0)


def receive_inputs(fields: tuple, pool: KVPool | None, device: torch.device) -> _Inputs:
    """A worker: the same canonical inputs, with this rank's own K/V buffers."""
    _, b, w, lq, has_write, has_buf, buf_rows, buf_len, m0, m1, m2, m3 = fields[:12]
    packed = torch.empty(b * w * (2 + has_write) + b * lq, dtype=torch.long, device=device)
    dist.broadcast(packed, 0)
    ids, pos = packed[:b * w].view(b, w), packed[b * w:2 * b * w].view(b, w)
    index = packed[2 * b * w:2 * b * w + b * lq].view(b, lq)
    write = packed[2 * b * w + b * lq:].view(b, w) if has_write else None
    mask = None
    if m0:
        mask = torch.empty(m0, m1, m2, m3, dtype=torch.uint8, device=device)
        dist.broadcast(mask, 0)
        mask = mask.bool()
    buffers = pool.view(buf_rows, buf_len) if has_buf else None
    return _Inputs(ids, pos, index, write, mask, buffers)


def gather_logits(group, local: torch.Tensor) -> torch.Tensor:
    """Rank 0: every rank's vocabulary slice of the logits, concatenated."""
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(group.size)]
    group.collective(dist.gather, local, parts, 0)
    return torch.cat(parts, dim=-1)

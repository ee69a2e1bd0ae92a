"""The cache interface: a policy answers, before every forward, which slice of the canvas the model computes
and which keys/values each layer attends to, and owns the K/V buffers that survive between forwards.

Verbs of a policy (the engine calls nothing else):
  check(spec)                                    refuse a model this policy cannot serve (class method)
  allocate(batch, length, arch, spec, dtype, device)
                                                 once per decoding run; static buffers
  plan(start, end, step, mask) -> ForwardPlan    before each forward of block [start, end); `step` counts the
                                                 forwards made in this block so far (0 = block start);
                                                 mask(q_start, q_end, k_end) gives the attention mask
  select_rows(keep)                              rows left the batch (finished early)

A `ForwardPlan` is the `dllm.attention.AttentionPlan` the model consumes: the fed slice [start, end), and
per layer `kv()`, which writes the fed tokens' K/V into the buffers and returns what to attend to. Policies
that need other shapes subclass ForwardPlan; the engine and the model stay unchanged:
  - per-row gathers: `index` [B, n] names the canvas columns fed (instead of the slice), `logits_index`
    [B, end - start] the fed slot whose output gives each block column's logits (shifted models: the column
    before it); see `IndexedPlan`;
  - per-layer recompute and attention statistics: the optional `attention()` / `layer_input()` hooks of
    `dllm.attention.AttentionPlan`;
  - `commit_mask` [B, end - start] bool: the block columns this forward may commit (None = every masked one),
    for policies that only give usable logits for part of the block (Elastic-Cache's window);
  - compute accounting: `kv_computations` ([B] tensor or int) = token x layer K/V computations this forward
    made per row; when left None the engine counts every fed token in every layer.

The policy sees the canvas (`self.canvas`, attached by the engine before the first plan; its `tokens` are the
state before the forward being planned), so it can tell which positions were decoded since its last forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dllm.errors import InvalidParameterError
from dllm.kv import KVBuffers
from dllm.options import resolve_options
from dllm.models.spec import ArchConfig, ModelSpec


@dataclass
class ForwardPlan:
    """Feed canvas[:, start:end]; with buffers, store its K/V at [start, end) and attend to keys [0, read_end).
    `first_only`: this forward may commit only the block's first position (see `decoding/base.py`)."""

    start: int
    end: int
    attn_mask: torch.Tensor | None = None
    buffers: KVBuffers | None = None
    read_end: int = 0
    first_only: bool = False
    index: torch.Tensor | None = None
    logits_index: torch.Tensor | None = None
    kv_computations: torch.Tensor | int | None = None
    commit_mask: torch.Tensor | None = None

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.buffers is None:
            return k, v
        kb, vb = self.buffers.k[layer], self.buffers.v[layer]
        kb[:, :, self.start:self.end] = k
        vb[:, :, self.start:self.end] = v
        return kb[:, :, :self.read_end], vb[:, :, :self.read_end]


class IndexedPlan(ForwardPlan):
    """Feed the canvas columns `index` [B, n] (rows may feed different columns; `valid` [B, n] False marks
    padding slots, whose K/V are written to a scratch column that no query sees); every query attends to
    every column's K/V in the buffers (length + 1 columns, the last being the scratch one)."""

    def __init__(self, index: torch.Tensor, valid: torch.Tensor | None, logits_index: torch.Tensor,
                 buffers: KVBuffers, key_mask: torch.Tensor, first_only: bool = False):
        super().__init__(0, 0, key_mask, buffers, 0, first_only, index, logits_index)
        scratch = buffers.k[0].shape[2] - 1
        self.write = index if valid is None else index.masked_fill(~valid, scratch)       # [B, n]
        self.kv_computations = None if valid is None else valid.sum(1) * len(buffers.k)   # token x layer

    def kv(self, layer, k, v):
        kb, vb = self.buffers.k[layer], self.buffers.v[layer]
        where = self.write[:, None, :, None].expand(-1, kb.shape[1], -1, kb.shape[3])
        kb.scatter_(2, where, k)
        vb.scatter_(2, where, v)
        return kb, vb


class CachePolicy:
    """Base policy with the buffer bookkeeping; subclasses implement `plan`."""

    name = "base"
    needs_buffers = True
    attentions = ("full", "block_causal")  # attention patterns the policy serves
    supports_cfg = True
    supports_remask = True  # a strategy may turn committed positions back into MASK (see `on_remask`)
    feeds_all = False       # every forward feeds every canvas column (strategies that read all generated logits)
    tensor_parallel = True  # its plans work on a rank's shard of the heads (false: plans that hook attention)
    scratch_column = False  # IndexedPlan policies: one extra buffer column for padding slots
    options: dict = {}      # option name -> default (`LLM(..., cache_options={...})`, CLI `--cache-option k=v`)

    def __init__(self, **options) -> None:
        self.opts = self.resolve_options(options)
        self.buffers: KVBuffers | None = None
        self.length = 0
        self.shift_logits = False
        self.canvas = None
        self.stop_ids: torch.Tensor | None = None
        self.params = None
        # Where K/V buffers come from: set by the engine to the runner's pool (views that outlive the run);
        # None allocates fresh buffers.
        self.kv_source = None
        # K/V columns a strategy's own forwards write after the canvas (set by the engine before `allocate`);
        # the buffer is [canvas | extra | scratch column (policies with `scratch_column`)]
        self.extra_columns = 0

    @classmethod
    def resolve_options(cls, options: dict) -> dict:
        """The policy's options with defaults filled; unknown names and values of the wrong type are refused."""
        return resolve_options("cache", cls.name, cls.options, options)

    def row_stats(self, row: int) -> dict:
        """Policy-specific per-request statistics for row `row` of the current batch (RequestMetrics.cache_stats)."""
        return {}

    def attach(self, canvas, stop_ids: torch.Tensor | None = None, params=None) -> None:
        """The engine's canvas of this run (read-only for the policy), the run's stop token ids and its resolved
        SamplingParams."""
        self.canvas, self.stop_ids, self.params = canvas, stop_ids, params

    @classmethod
    def check(cls, spec: ModelSpec) -> None:
        if spec.attention not in cls.attentions:
            raise InvalidParameterError(
                f"cache '{cls.name}' needs {' or '.join(cls.attentions)} attention, and {spec.family} models use "
                f"{spec.attention} attention; choose another cache")

    def allocate(self, batch: int, length: int, arch: ArchConfig, spec: ModelSpec, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.length, self.shift_logits = length, spec.shift_logits
        if self.needs_buffers:
            cols = length + self.extra_columns + int(self.scratch_column)
            self.buffers = (self.kv_source(batch, cols) if self.kv_source is not None
                            else KVBuffers.allocate(arch, batch, cols, dtype, device))

    def plan(self, start: int, end: int, step: int, mask) -> ForwardPlan:
        raise NotImplementedError

    def select_rows(self, keep: torch.Tensor) -> None:
        if self.buffers is not None:
            self.buffers.select_rows(keep)

    def on_remask(self, remasked: torch.Tensor) -> None:
        """Positions [B, T] went back to MASK: their cached K/V are stale. Policies that reuse K/V refresh
        everything at their next forward (`take_refresh`)."""
        self.refresh = True

    def on_truncate(self) -> None:
        """A row's canvas got shorter (its keys past the end are hidden from now on)."""

    def take_refresh(self) -> bool:
        refresh, self.refresh = getattr(self, "refresh", False), False
        return refresh

    def full(self, mask) -> ForwardPlan:
        """Recompute everything; with buffers, refresh all of them."""
        return ForwardPlan(0, self.length, mask(0, self.length, self.length), self.buffers, self.length)

    def window(self, start: int, end: int, mask, read_end: int | None = None) -> ForwardPlan:
        """Recompute [start, end), refresh those entries, attend to keys [0, read_end) (default: all)."""
        read_end = self.length if read_end is None else read_end
        return ForwardPlan(start, end, mask(start, end, read_end), self.buffers, read_end)


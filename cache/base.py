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
that need other shapes (per-row gathers, per-layer recompute, attention statistics) subclass ForwardPlan;
the engine and the model stay unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dllm.errors import InvalidParameterError
from dllm.models.spec import ArchConfig, ModelSpec


class KVBuffers:
    """Post-RoPE keys and values of every layer for a batch: k[l], v[l] of shape [B, Hkv, T, D]."""

    def __init__(self, arch: ArchConfig, batch: int, length: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, arch.num_kv_heads, length, arch.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]

    def select_rows(self, keep: torch.Tensor) -> None:
        self.k = [k[keep] for k in self.k]
        self.v = [v[keep] for v in self.v]


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

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.buffers is None:
            return k, v
        kb, vb = self.buffers.k[layer], self.buffers.v[layer]
        kb[:, :, self.start:self.end] = k
        vb[:, :, self.start:self.end] = v
        return kb[:, :, :self.read_end], vb[:, :, :self.read_end]


class CachePolicy:
    """Base policy with the buffer bookkeeping; subclasses implement `plan`."""

    name = "base"
    needs_buffers = True
    attentions = ("full", "block_causal")  # attention patterns the policy serves

    def __init__(self) -> None:
        self.buffers: KVBuffers | None = None
        self.length = 0
        self.shift_logits = False

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
            self.buffers = KVBuffers(arch, batch, length, dtype, device)

    def plan(self, start: int, end: int, step: int, mask) -> ForwardPlan:
        raise NotImplementedError

    def select_rows(self, keep: torch.Tensor) -> None:
        if self.buffers is not None:
            self.buffers.select_rows(keep)

    def full(self, mask) -> ForwardPlan:
        """Recompute everything; with buffers, refresh all of them."""
        return ForwardPlan(0, self.length, mask(0, self.length, self.length), self.buffers, self.length)

    def window(self, start: int, end: int, mask, read_end: int | None = None) -> ForwardPlan:
        """Recompute [start, end), refresh those entries, attend to keys [0, read_end) (default: all)."""
        read_end = self.length if read_end is None else read_end
        return ForwardPlan(start, end, mask(start, end, read_end), self.buffers, read_end)

"""The cache interface: a policy answers, before every forward, which slice of the canvas the model computes
and which keys/values each layer attends to, and owns the K/V buffers that survive between forwards.

Verbs of a policy (the engine calls nothing else):
  allocate(batch, length, arch, dtype, device)   once per decoding run; static buffers
  plan(start, end, step, key_valid) -> ForwardPlan
                                                 before each forward of block [start, end); `step` counts the
                                                 forwards made in this block so far (0 = block start)
  select_rows(keep)                              rows left the batch (finished early)

A `ForwardPlan` is the `dllm.attention.AttentionPlan` the model consumes: the fed slice [start, end), and
per layer `kv()`, which writes the fed tokens' K/V into the buffers and returns what to attend to. Policies
that need other shapes (per-row gathers, per-layer recompute, attention statistics) subclass ForwardPlan;
the engine and the model stay unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dllm.attention import key_padding_mask
from dllm.models.spec import ArchConfig


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
    """Feed canvas[:, start:end]; with buffers, store its K/V at [start, end) and attend to keys [0, read_end)."""

    start: int
    end: int
    attn_mask: torch.Tensor | None = None
    buffers: KVBuffers | None = None
    read_end: int = 0

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

    def __init__(self) -> None:
        self.buffers: KVBuffers | None = None
        self.length = 0

    def allocate(self, batch: int, length: int, arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.length = length
        if self.needs_buffers:
            self.buffers = KVBuffers(arch, batch, length, dtype, device)

    def plan(self, start: int, end: int, step: int, key_valid: torch.Tensor | None) -> ForwardPlan:
        raise NotImplementedError

    def select_rows(self, keep: torch.Tensor) -> None:
        if self.buffers is not None:
            self.buffers.select_rows(keep)

    def full(self, key_valid: torch.Tensor | None) -> ForwardPlan:
        """Recompute everything; with buffers, refresh all of them."""
        return ForwardPlan(0, self.length, key_padding_mask(key_valid), self.buffers, self.length)

    def window(self, start: int, end: int, key_valid: torch.Tensor | None) -> ForwardPlan:
        """Recompute [start, end), refresh those entries, attend to the whole (partly cached) canvas."""
        return ForwardPlan(start, end, key_padding_mask(key_valid), self.buffers, self.length)

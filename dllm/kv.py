"""K/V storage: the buffers a cache policy reads and writes during a run, and the pool they are views of.

Keys are stored after RoPE. `KVBuffers` holds one [B, Hkv, T, D] tensor per layer for keys and one for values;
`KVPool` is the runner's storage for up to `slots` rows of up to `length` columns, from which each run takes a
view of a contiguous range of rows (its slots, from `offset`), so the storage (and the CUDA graphs that captured
its addresses) outlives the run, and runs decoding side by side (the step scheduler's cohorts) hold disjoint slots.
"""
from __future__ import annotations

import torch

from dllm.models.spec import ArchConfig


class KVBuffers:
    """Post-RoPE keys and values of every layer for a batch: k[l], v[l] of shape [B, Hkv, T, D] (views)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], on_select=None, offset: int | None = None):
        self.k, self.v = k, v
        self.on_select = on_select   # called with (rows before, columns, keep) before compacting (other ranks)
        self.offset = offset         # the first pool slot of a pool view (None: storage of its own)

    @classmethod
    def allocate(cls, arch: ArchConfig, batch: int, length: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, arch.num_kv_heads, length, arch.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)])

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep rows `keep` (in that order), compacted in place to the front, so the storage stays put."""
        n = keep.numel()
        if self.on_select is not None:
            self.on_select(self.k[0].shape[0], self.k[0].shape[2], keep)
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                t[:n] = t[keep]
                buf[i] = t[:n]


class KVPool:
    """K/V storage for `slots` rows of up to `length` columns: k[l], v[l] [slots, Hkv, length, D]."""

    def __init__(self, arch: ArchConfig, slots: int, length: int, dtype: torch.dtype, device: torch.device):
        self.slots, self.length = slots, length
        self.buffers = KVBuffers.allocate(arch, slots, length, dtype, device)

    def view(self, batch: int, length: int, offset: int = 0) -> KVBuffers:
        rows = slice(offset, offset + batch)
        return KVBuffers([k[rows, :, :length] for k in self.buffers.k], [v[rows, :, :length] for v in self.buffers.v],
                         offset=offset)

    def owns(self, buffers: KVBuffers) -> bool:
        return (buffers.offset is not None and
                buffers.k[0].untyped_storage().data_ptr() == self.buffers.k[0].untyped_storage().data_ptr())

    @property
    def nbytes(self) -> int:
        return 2 * sum(k.numel() * k.element_size() for k in self.buffers.k)

"""What a strategy may do beyond choosing tokens: run its own forward through the runner (S2D2's verification
pass, a drafter's pass), counted in every row's NFE and K/V work, without touching the cache's K/V.

`forward(ids, positions, visible, prefix_end, rows=None)`: W tokens per row at the given positions. Each attends to the
canvas keys before `prefix_end` (as the cache holds them after this step's forward: read-only) and to the fed
tokens themselves as `visible` [B, W, W] says (query row, key column). Their own keys and values go to scratch
columns after the canvas (`Strategy.scratch_width`), which nothing else reads. With no cache (no K/V buffers)
the canvas prefix is fed along, under the canvas's own attention mask. Returns logits [B, W, V] (position i's
own hidden state; the caller applies a shifted family's alignment itself). `rows` ([B] bools, default all):
the rows the forward is made for; only they are charged the forward in NFE and K/V work (other rows ride along
in the batch, as they would not run it alone).
"""
from __future__ import annotations

import torch

from dllm.cache.base import IndexedPlan


class StepContext:
    def __init__(self, run):
        self.run = run
        self.extra_forwards: torch.Tensor | None = None   # [B] this step's forwards beyond the engine's own
        self.extra_kv: torch.Tensor | int = 0

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
                prefix_end: int, rows=None) -> torch.Tensor:
        run = self.run
        canvas, buffers = run.canvas, run.cache.buffers
        b, w = ids.shape
        charged = torch.ones(b, dtype=torch.long) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self.extra_forwards = charged if self.extra_forwards is None else self.extra_forwards + charged
        self._charged = charged.to(ids.device)
        self.extra_kv = self.extra_kv + w * run.num_layers * self._charged
        if buffers is None:
            return self._uncached(ids, positions, visible, prefix_end)
        first = canvas.length                  # buffer columns: [canvas | strategy scratch | padding column]
        declared = run.cache.extra_columns
        if w > declared:
            raise RuntimeError(f"strategy {run.strategy.name!r} asked for {w} scratch columns but declared "
                               f"{declared} (Strategy.scratch_width)")
        total = buffers.k[0].shape[2]
        dev = ids.device
        cols = torch.arange(total, device=dev)
        keys = (cols < prefix_end)[None, None, :].expand(b, w, total).clone()      # [B, W, K]
        if canvas.key_valid is not None:
            keys[:, :, :canvas.length] &= canvas.key_valid[:, None, :]
        keys[:, :, first:first + w] = visible
        write = (first + torch.arange(w, device=dev)).expand(b, w)
        plan = IndexedPlan(write, None, torch.arange(w, device=dev).expand(b, w), buffers, keys[:, None])
        return run.engine.runner.forward(ids, positions, plan, plan.logits_index)

    def _uncached(self, ids, positions, visible, prefix_end):
        """No K/V buffers: feed the canvas prefix too; it attends as the canvas does, the W tokens as asked."""
        run, canvas = self.run, self.run.canvas
        b, w = ids.shape
        n = prefix_end + w
        prefix_mask = run.mask_fn(0, prefix_end, prefix_end)
        mask = torch.zeros(b, 1, n, n, dtype=torch.bool, device=ids.device)
        mask[:, :, :prefix_end, :prefix_end] = True if prefix_mask is None else prefix_mask
        keys = torch.ones(b, prefix_end, dtype=torch.bool, device=ids.device) if canvas.key_valid is None \
            else canvas.key_valid[:, :prefix_end]
        mask[:, 0, prefix_end:, :prefix_end] = keys[:, None, :]
        mask[:, 0, prefix_end:, prefix_end:] = visible
        all_ids = torch.cat([canvas.tokens[:, :prefix_end], ids], 1)
        all_pos = torch.cat([canvas.positions[:, :prefix_end], positions], 1)
        plan = _MaskOnly(mask)
        index = (prefix_end + torch.arange(w, device=ids.device)).expand(b, w)
        self.extra_kv = self.extra_kv + prefix_end * run.num_layers * self._charged
        return run.engine.runner.forward(all_ids, all_pos, plan, index)

    def take(self) -> tuple[list[int] | None, torch.Tensor | int]:
        """(extra forwards per row or None, extra K/V work per row) of the step just made, and reset."""
        out = (None if self.extra_forwards is None else self.extra_forwards.tolist(), self.extra_kv)
        self.extra_forwards, self.extra_kv = None, 0
        return out


class _MaskOnly:
    """A plan with no K/V buffers: attend among the fed tokens under `attn_mask`."""

    index = None
    buffers = None

    def __init__(self, attn_mask: torch.Tensor):
        self.attn_mask = attn_mask

    def kv(self, layer, k, v):
        return k, v

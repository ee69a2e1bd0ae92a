"""Fast-dLLM DualCache (arXiv 2505.22618, Alg. 1 "prefix & suffix"): at each block start one full forward
refreshes every position; the block's later steps recompute only the block and reuse the cached K/V of both
the prefix and the MASK suffix after the block, both frozen until the next block start. On shifted-logit
models the block-start forward commits the block's first position (see `prefix.py`).

A strategy that cuts a row's canvas (Learn2PD's end-of-text prediction) after the block start: as in the authors'
`generate_with_dual_cache`, the rest of the block reads the keys the block start saw (the cut columns included)
and recomputes only the block columns before the cut, leaving the K/V after them as last written; the cut takes
effect for attention at the next block start."""
import torch

from dllm.cache.base import CachePolicy, ForwardPlan, IndexedPlan


class DualCache(CachePolicy):
    name = "dual"

    def plan(self, start, end, step, mask) -> ForwardPlan:
        if step == 0 or self.take_refresh():
            plan = self.full(mask)
            plan.first_only = self.shift_logits
            self.block_mask, self.block_ends = mask(start, end, self.length), list(self.canvas.ends)
            return plan
        if self.canvas.ends == self.block_ends:
            return self.window(start, end, mask)
        return self._cut_block(start, end)

    def _cut_block(self, start: int, end: int) -> IndexedPlan:
        """Feed the block columns before each row's end (a shorter row repeats its last column, which writes the
        same K/V twice); attend to the keys the block start saw."""
        dev = self.canvas.tokens.device
        rows = self.buffers.k[0].shape[0]
        ends = torch.tensor(self.canvas.ends, device=dev).clamp(max=end)
        if rows != ends.shape[0]:                                            # CFG: conditional + unconditional rows
            ends = torch.cat([ends, ends])
        width = max(1, min(max(self.canvas.ends), end) - start)   # from the host list: no device sync
        last = (ends - 1).clamp(min=start)[:, None]                                        # [B, 1]
        index = torch.minimum(torch.arange(start, start + width, device=dev)[None, :], last)  # [B, W]
        total = self.buffers.k[0].shape[2]
        keys = None
        if self.block_mask is not None or total != self.length:
            lq = 1 if self.block_mask is None else self.block_mask.shape[2]
            keys = torch.zeros(rows, 1, lq, total, dtype=torch.bool, device=dev)
            keys[..., :self.length] = True if self.block_mask is None else self.block_mask
        shift = int(self.shift_logits)
        logits_index = (torch.arange(end - start, device=dev) - shift).clamp(0, width - 1).expand(rows, -1)
        return IndexedPlan(index, None, logits_index, self.buffers, keys)

    def select_rows(self, keep: torch.Tensor) -> None:
        super().select_rows(keep)
        rows = len(getattr(self, "block_ends", ()))
        if rows and self.block_mask is not None and self.block_mask.shape[0] > 1:
            self.block_mask = self.block_mask[keep]
        if rows:
            self.block_ends = [self.block_ends[i] for i in keep[keep < rows].tolist()]

"""Exact block cache for block-causal models (SDAR): a block attends only to itself and the blocks before it,
so once a block is final its keys/values never change. Each block's first forward also computes the K/V of
the blocks finalised since the last store (the prompt on the first block, the previous block afterwards), which
is SDAR's separate `store_kv` forward folded into the next one; later forwards recompute the current block only.
Every committed block's K/V is written once and reused; nothing is approximate."""
from dllm.cache.base import CachePolicy, ForwardPlan


class BlockCache(CachePolicy):
    name = "block"
    attentions = ("block_causal",)

    def allocate(self, *args, **kwargs) -> None:
        super().allocate(*args, **kwargs)
        self.stored_until = 0   # columns [0, stored_until) hold final K/V

    def plan(self, start, end, step, mask) -> ForwardPlan:
        if self.take_refresh():   # a remasked position: recompute every stored block and the current one
            self.stored_until = start
            return self.window(0, end, mask, read_end=end)
        if step == 0:
            lo, self.stored_until = self.stored_until, start
            return self.window(lo, end, mask, read_end=end)
        return self.window(start, end, mask, read_end=end)

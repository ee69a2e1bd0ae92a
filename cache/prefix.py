"""Fast-dLLM PrefixCache (arXiv 2505.22618, Alg. 1): at each block start one full forward refreshes the K/V
of every position; the block's later steps recompute the block and everything after it, and reuse the
cached K/V of the prefix (prompt and finished blocks), which is frozen until the next block start."""
from cache.base import CachePolicy, ForwardPlan


class PrefixCache(CachePolicy):
    name = "prefix"

    def plan(self, start, end, step, key_valid) -> ForwardPlan:
        if step == 0:
            return self.full(key_valid)
        return self.window(start, self.length, key_valid)

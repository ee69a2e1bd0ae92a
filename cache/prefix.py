"""Fast-dLLM PrefixCache (arXiv 2505.22618, Alg. 1): at each block start one full forward refreshes the K/V
of every position; the block's later steps recompute the block and everything after it, and reuse the
cached K/V of the prefix (prompt and finished blocks), which is frozen until the next block start.

On a model whose logits are shifted (Dream), the block's first position is predicted from the position before
the block, which later steps do not recompute; as in Fast-dLLM's cached Dream path, the block-start forward
then commits exactly that first position."""
from dllm.cache.base import CachePolicy, ForwardPlan


class PrefixCache(CachePolicy):
    name = "prefix"

    def plan(self, start, end, step, mask) -> ForwardPlan:
        if step == 0 or self.take_refresh():
            plan = self.full(mask)
            plan.first_only = self.shift_logits
            return plan
        return self.window(start, self.length, mask)

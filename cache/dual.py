"""Fast-dLLM DualCache (arXiv 2505.22618, Alg. 1 "prefix & suffix"): at each block start one full forward
refreshes every position; the block's later steps recompute only the block and reuse the cached K/V of both
the prefix and the MASK suffix after the block, both frozen until the next block start. On shifted-logit
models the block-start forward commits the block's first position (see `prefix.py`)."""
from dllm.cache.base import CachePolicy, ForwardPlan


class DualCache(CachePolicy):
    name = "dual"

    def plan(self, start, end, step, mask) -> ForwardPlan:
        if step == 0 or self.take_refresh():
            plan = self.full(mask)
            plan.first_only = self.shift_logits
            return plan
        return self.window(start, end, mask)

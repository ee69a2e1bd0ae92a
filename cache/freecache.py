"""FreeCache (FlashDLM, arXiv 2505.21467; ZhanqiuHu/flash-dlm-experimental @ 387beab): the keys/values of the
"clean" prefix (the prompt, then every finished block) are computed once and frozen; each step recomputes the
current block and everything after it.

The run's first forward is full. Every later forward of block [start, end) feeds columns [start - s, L), where
s = 1 on shifted-logit models (Dream reads the block's first logit from the position before it) and 0 otherwise,
and attends to the frozen K/V of [0, start - s). Columns [start - s, end - s) are frozen with the K/V of the block's
last forward, which ran before that step's commit (the authors' `save_cache` on a block's last step). Unlike
Fast-dLLM's prefix cache there is no full refresh at block starts: the prompt's K/V are those of the first forward,
computed against an all-MASK answer.

The authors' sliding-window option is not built: it is dead code in their FreeCache path and inconsistent in the
guided path. Full-attention models only (SDAR keeps its exact `block` cache).
"""
from dllm.cache.base import CachePolicy, ForwardPlan


class FreeCache(CachePolicy):
    name = "freecache"
    attentions = ("full",)
    supports_cfg = False

    def allocate(self, *args, **kwargs) -> None:
        super().allocate(*args, **kwargs)
        self.started = False

    def plan(self, start, end, step, mask) -> ForwardPlan:
        if not self.started or self.take_refresh():
            self.started = True
            return self.full(mask)
        return self.window(start - int(self.shift_logits), self.length, mask)

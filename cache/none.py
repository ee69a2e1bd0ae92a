"""No cache: every forward recomputes the whole canvas (the reference procedure of every family)."""
from dllm.cache.base import CachePolicy, ForwardPlan


class NoCache(CachePolicy):
    name = "none"
    needs_buffers = False
    feeds_all = True
    attentions = ("full", "block_causal", "tidar")   # TiDAR's strategies keep their own exact K/V cache

    def plan(self, start, end, step, mask) -> ForwardPlan:
        return self.full(mask)

"""No cache: every forward recomputes the whole canvas (the reference LLaDA procedure)."""
from cache.base import CachePolicy, ForwardPlan


class NoCache(CachePolicy):
    name = "none"
    needs_buffers = False

    def plan(self, start, end, step, key_valid) -> ForwardPlan:
        return self.full(key_valid)

"""KV-cache policies, looked up by name. See `base.py` for the interface every policy implements."""
from cache.base import CachePolicy, ForwardPlan, KVBuffers
from cache.dual import DualCache
from cache.none import NoCache
from cache.prefix import PrefixCache
from dllm.errors import InvalidParameterError

CACHES = {cls.name: cls for cls in (NoCache, PrefixCache, DualCache)}


def make_cache(name: str) -> CachePolicy:
    if name not in CACHES:
        raise InvalidParameterError(f"unknown cache {name!r}; choose one of: {', '.join(CACHES)}")
    return CACHES[name]()


__all__ = ["CACHES", "CachePolicy", "ForwardPlan", "KVBuffers", "make_cache"]

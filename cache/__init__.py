"""KV-cache policies, looked up by name. See `base.py` for the interface every policy implements."""
from cache.base import CachePolicy, ForwardPlan, IndexedPlan, KVBuffers
from cache.block import BlockCache
from cache.dkv import DKVCache
from cache.dual import DualCache
from cache.elastic import ElasticCache
from cache.freecache import FreeCache
from cache.none import NoCache
from cache.prefix import PrefixCache
from dllm.errors import InvalidParameterError

CACHES = {cls.name: cls for cls in (NoCache, PrefixCache, DualCache, BlockCache, DKVCache, ElasticCache, FreeCache)}


def cache_class(name: str) -> type[CachePolicy]:
    if name not in CACHES:
        raise InvalidParameterError(f"unknown cache {name!r}; choose one of: {', '.join(CACHES)}")
    return CACHES[name]


def make_cache(name: str, options: dict | None = None) -> CachePolicy:
    return cache_class(name)(**(options or {}))


__all__ = ["CACHES", "CachePolicy", "ForwardPlan", "IndexedPlan", "KVBuffers", "cache_class", "make_cache"]

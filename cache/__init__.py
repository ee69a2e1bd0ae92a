"""KV-cache policies, looked up by name. See `base.py` for the interface every policy implements."""
from dllm.cache.base import CachePolicy, ForwardPlan, IndexedPlan, KVBuffers
from dllm.cache.block import BlockCache
from dllm.cache.dkv import DKVCache
from dllm.cache.dual import DualCache
from dllm.cache.elastic import ElasticCache
from dllm.cache.freecache import FreeCache
from dllm.cache.none import NoCache
from dllm.cache.prefix import PrefixCache
from dllm.errors import InvalidParameterError

CACHES = {cls.name: cls for cls in (NoCache, PrefixCache, DualCache, BlockCache, DKVCache, ElasticCache, FreeCache)}


def cache_class(name: str) -> type[CachePolicy]:
    if name not in CACHES:
        raise InvalidParameterError(f"unknown cache {name!r}; choose one of: {', '.join(CACHES)}")
    return CACHES[name]


def make_cache(name: str, options: dict | None = None) -> CachePolicy:
    return cache_class(name)(**(options or {}))


__all__ = ["CACHES", "CachePolicy", "ForwardPlan", "IndexedPlan", "KVBuffers", "cache_class", "make_cache"]

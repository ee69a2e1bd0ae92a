"""The strategy and KV cache that `LLM()`, the CLI and the eval harness use when none is named ("auto"), per
model family.

Chosen by measurement (BENCHMARKS.md, "Default strategy and cache"): on each family's zoo model, every
threshold/factor x cache setting over the 200 held-out problems of each zoo task on the CPU; the default is the
fastest setting whose accuracy is within 1 point of the family's reference sampler on every task. With another
strategy, "auto" picks the cache measured best for it, else the family's exact cache, so `strategy="reference"`
alone is the family's published sampler, token for token.
"""
from __future__ import annotations

AUTO = "auto"
# TiDAR: its own decoding (not measured: greedy TiDAR emits exactly the tokens of its AR decoding, in fewer forwards)
DEFAULT_STRATEGY = {"llada": "factor", "dream": "threshold", "sdar": "factor", "tidar": "tidar"}
# (family, strategy) -> the fastest cache within 1 point on every zoo task; others get EXACT_CACHE.
MEASURED_CACHE = {("llada", "factor"): "freecache", ("llada", "threshold"): "freecache",
                  ("sdar", "factor"): "block", ("sdar", "threshold"): "block"}
# Block-causal SDAR: the block cache equals no cache exactly (tests/test_parity_sdar.py) and is faster.
EXACT_CACHE = {"sdar": "block"}


def resolve_strategy(strategy: str, family: str) -> str:
    """`strategy`, or the family's default for "auto"."""
    return DEFAULT_STRATEGY.get(family, "reference") if strategy == AUTO else strategy


def resolve_cache(cache: str, family: str, strategy: str) -> str:
    """`cache`, or for "auto" the cache measured best for this family and (resolved) strategy, else the exact one."""
    if cache != AUTO:
        return cache
    return MEASURED_CACHE.get((family, strategy), EXACT_CACHE.get(family, "none"))


def describe() -> str:
    """One line for --help: what "auto" means for each family."""
    return "; ".join(f"{family}: {strategy} with {resolve_cache(AUTO, family, strategy)} cache"
                     for family, strategy in DEFAULT_STRATEGY.items())

"""Decoding strategies, looked up by name. See `base.py` for the interface every strategy implements."""
from decoding.base import Strategy
from decoding.factor import FactorStrategy
from decoding.reference import ReferenceStrategy
from decoding.threshold import ThresholdStrategy
from dllm.errors import InvalidParameterError

STRATEGIES = {cls.name: cls for cls in (ReferenceStrategy, ThresholdStrategy, FactorStrategy)}


def strategy_class(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise InvalidParameterError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "Strategy", "strategy_class"]

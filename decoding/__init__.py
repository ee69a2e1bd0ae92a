"""Decoding strategies, looked up by name (and, for `reference`, by model family: each family's authors'
own sampler). See `base.py` for the interface every strategy implements."""
from decoding.base import Strategy
from decoding.dream import DreamReference
from decoding.factor import FactorStrategy
from decoding.guided import GuidedStrategy
from decoding.llada import LLaDAReference
from decoding.sdar import SDARReference
from decoding.threshold import ThresholdStrategy
from dllm.errors import InvalidParameterError

STRATEGIES = {
    "reference": {"llada": LLaDAReference, "dream": DreamReference, "sdar": SDARReference},
    "threshold": ThresholdStrategy,
    "factor": FactorStrategy,
    "guided": GuidedStrategy,
}


def check_strategy_name(name: str) -> None:
    if name not in STRATEGIES:
        raise InvalidParameterError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")


def strategy_class(name: str, family: str) -> type[Strategy]:
    check_strategy_name(name)
    entry = STRATEGIES[name]
    if isinstance(entry, dict):
        if family not in entry:
            raise InvalidParameterError(f"strategy {name!r} has no implementation for {family} models")
        return entry[family]
    return entry


__all__ = ["STRATEGIES", "Strategy", "check_strategy_name", "strategy_class"]

"""Decoding strategies, looked up by name (and, for `reference`, by model family: each family's authors'
own sampler). See `base.py` for the interface every strategy implements."""
from dllm.decoding.base import Strategy
from dllm.decoding.dream import DreamReference
from dllm.decoding.factor import FactorStrategy
from dllm.decoding.guided import GuidedStrategy
from dllm.decoding.learn2pd import Learn2PDStrategy
from dllm.decoding.llada import LLaDAReference
from dllm.decoding.s2d2 import S2D2Strategy
from dllm.decoding.saber import SaberDream, SaberLLaDA
from dllm.decoding.sdar import SDARReference
from dllm.decoding.threshold import ThresholdStrategy
from dllm.decoding.tidar import TiDARAutoregressive, TiDARStrategy
from dllm.errors import InvalidParameterError

STRATEGIES = {
    "reference": {"llada": LLaDAReference, "dream": DreamReference, "sdar": SDARReference},
    "threshold": ThresholdStrategy,
    "factor": FactorStrategy,
    "guided": GuidedStrategy,
    "s2d2": S2D2Strategy,
    "learn2pd": Learn2PDStrategy,
    "saber": {"llada": SaberLLaDA, "dream": SaberDream},
    "tidar": {"tidar": TiDARStrategy},
    "ar": {"tidar": TiDARAutoregressive},
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

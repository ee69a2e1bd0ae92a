"""A run's setting with every default written out one way, so that spelling a default (`--cache freecache` where
it is the default, `--max-tokens 128`, `--threshold 0.9`, `--chat` where the task chats anyway) names the same run
directory as leaving it out, and a resumed run matches.

Read from the checkpoint's config.json and generation_config.json only (no weights, no tokenizer): the family, its
"auto" strategy and cache (`dllm/defaults.py`), the sampling fields the checkpoint fills (`SamplingParams.resolve`),
the strategies' own option defaults; fields the strategy does not read are dropped.
"""
from __future__ import annotations

import dataclasses

from dllm.decoding import factor, sdar, strategy_class, threshold
from dllm.decoding.base import Strategy
from dllm.defaults import resolve_cache, resolve_strategy
from dllm.sampling_params import SamplingParams

# (strategy, family or None for all) -> {option: the value the strategy uses when the option is None}
OPTION_DEFAULTS = {("threshold", None): {"threshold": threshold.DEFAULT_THRESHOLD},
                   ("factor", None): {"factor": factor.DEFAULT_FACTOR},
                   ("reference", "sdar"): {"threshold": sdar.DEFAULT_THRESHOLD,
                                           "entropy_bound": sdar.DEFAULT_ENTROPY_BOUND},
                   ("s2d2", "sdar"): {"threshold": sdar.DEFAULT_THRESHOLD, "entropy_bound": sdar.DEFAULT_ENTROPY_BOUND}}


def canonical(config, task=None):
    """`config` (an EvalConfig) with strategy, cache, chat and sampling resolved; `task` fills `chat`."""
    from dllm.eval.bench import reads
    family, spec = _checkpoint_facts(config)
    strategy = resolve_strategy(config.strategy, family)
    cache = resolve_cache(config.cache, family, strategy)
    cls = strategy_class(strategy, family)
    given = SamplingParams(**config.sampling)
    if cls.request_defaults.__func__ is not Strategy.request_defaults.__func__:   # a preset's fields (S2D2)
        given = cls.request_defaults(given, cls.resolve_engine_options(dict(config.strategy_options or {})))
    params = given.resolve(spec.defaults, steps_mode=cls.steps_mode,
                                                       divisible=spec.attention == "full")
    filled = {**_option_defaults(strategy, family), **{k: v for k, v in dataclasses.asdict(params).items()
                                                       if v is not None}}
    defaults = dataclasses.asdict(SamplingParams())
    sampling = {k: v for k, v in filled.items()
                if k != "seed" and reads(strategy, family, k) and (v != defaults[k] or k in _ALWAYS)}
    chat = config.chat if config.chat is not None or task is None else task.default_chat
    return dataclasses.replace(config, strategy=strategy, cache=cache, sampling=sampling, chat=chat)


# Filled by resolve() for every strategy: kept even where they equal SamplingParams' own default, so that the
# setting states them.
_ALWAYS = ("max_tokens", "block_length", "temperature")


def _option_defaults(strategy: str, family: str) -> dict:
    return {**OPTION_DEFAULTS.get((strategy, None), {}), **OPTION_DEFAULTS.get((strategy, family), {})}


def _checkpoint_facts(config):
    """(family, ModelSpec) from the checkpoint's JSON files; the tokenizer-derived ids are not needed here."""
    from dllm.models.loader import read_json, resolve_path
    from dllm.models.registry import adapter_for
    path = resolve_path(config.model, config.revision)
    cfg = read_json(path / "config.json")
    gen = read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    adapter = adapter_for(cfg, where=str(path))
    return adapter.family, adapter.spec(cfg, gen, None)

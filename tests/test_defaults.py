"""The default strategy and cache ("auto", `dllm/defaults.py`): per family the measured pair, the same through the
API and the real `dllm` command, and `--strategy reference` alone is the published sampler with an exact cache."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from dllm import LLM, SamplingParams
from dllm.defaults import DEFAULT_STRATEGY, MEASURED_CACHE, describe, resolve_cache, resolve_strategy

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def dllm(*args):
    exe = shutil.which("dllm")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "dllm.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.parametrize("model,strategy,cache", [("tiny-llada", "factor", "freecache"),
                                                  ("tiny-dream", "threshold", "none"),
                                                  ("tiny-sdar", "factor", "block")])
def test_auto_is_the_measured_pair(model, strategy, cache):
    engine = LLM(model, device="cpu").engine
    assert (engine.strategy_name, engine.cache_name) == (strategy, cache)


@pytest.mark.parametrize("family,cache", [("llada", "none"), ("dream", "none"), ("sdar", "block")])
def test_reference_alone_gets_the_exact_cache(family, cache):
    assert resolve_cache("auto", family, resolve_strategy("reference", family)) == cache
    assert resolve_cache("dual", family, "reference") == "dual"          # a named cache is kept


def test_every_default_is_a_real_strategy_and_cache():
    from dllm.cache import CACHES
    from dllm.decoding import STRATEGIES
    assert set(DEFAULT_STRATEGY.values()) <= set(STRATEGIES) and set(MEASURED_CACHE.values()) <= set(CACHES)
    assert describe() == ("llada: factor with freecache cache; dream: threshold with none cache; "
                          "sdar: factor with block cache; tidar: tidar with none cache")


def test_cli_default_equals_the_spelled_out_setting_and_reference_is_one_flag_away():
    common = ["generate", "--no-chat", "-p", "What is 12 * 7?", "--max-tokens", "64", "--device", "cpu", "--json"]
    default, spelled = dllm(*common), dllm(*common, "--strategy", "factor", "--cache", "freecache")
    assert default.returncode == 0 and spelled.returncode == 0, default.stderr + spelled.stderr
    assert json.loads(default.stdout)["token_ids"] == json.loads(spelled.stdout)["token_ids"]
    reference = dllm(*common, "--strategy", "reference")
    assert reference.returncode == 0, reference.stderr
    want = LLM("tiny-llada", strategy="reference", cache="none", device="cpu").generate(
        "What is 12 * 7?", SamplingParams(max_tokens=64))[0]
    assert json.loads(reference.stdout)["token_ids"] == want.token_ids

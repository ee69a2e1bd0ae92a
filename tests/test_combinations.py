"""Combinations the runtime cannot serve are refused before decoding, with one line that says what to do."""
from __future__ import annotations

import pytest

from dllm import LLM, SamplingParams
from dllm.errors import InvalidParameterError


@pytest.mark.parametrize("family", ["tiny_llada", "tiny_dream"])
def test_block_cache_needs_block_causal_attention(request, family):
    with pytest.raises(InvalidParameterError, match="cache 'block' needs block_causal attention"):
        LLM(str(request.getfixturevalue(family)), cache="block", strategy="reference")


@pytest.mark.parametrize("family,kwargs,message", [
    ("tiny_llada", {"alg": "entropy"}, "alg does not apply to strategy 'reference' on llada"),
    ("tiny_llada", {"remasking": "sequential"}, "remasking='sequential' does not apply to llada"),
    ("tiny_llada", {"top_p": 0.9}, "top_p does not apply"),
    ("tiny_dream", {"remasking": "random"}, "remasking does not apply to strategy 'reference' on dream"),
    ("tiny_dream", {"cfg_scale": 1.0}, "cfg_scale does not apply"),
    ("tiny_sdar", {"alg": "origin"}, "alg does not apply to strategy 'reference' on sdar"),
    ("tiny_sdar", {"remasking": "random"}, "remasking='random' does not apply to sdar"),
    ("tiny_sdar", {"factor": 2.0}, "factor does not apply"),
])
def test_options_of_another_family_or_strategy_are_refused(request, llm_factory, family, kwargs, message):
    llm = llm_factory(path=request.getfixturevalue(family))
    with pytest.raises(InvalidParameterError, match=message):
        llm.generate("hi", SamplingParams(max_tokens=8, block_length=4, **kwargs))


def test_sdar_lengths_need_not_divide(llm_factory, tiny_sdar):
    """SDAR's canvas rounds up to whole blocks, as its authors' does; the output keeps max_tokens tokens."""
    out = llm_factory("block", path=tiny_sdar).generate(
        "hello", SamplingParams(max_tokens=10, block_length=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 10


def test_checkpoint_defaults_apply(llm_factory, tiny_sdar, tiny_dream):
    sdar = llm_factory(path=tiny_sdar)
    assert sdar.engine.resolve(SamplingParams()).block_length == sdar.spec.native_block_size
    dream = llm_factory(path=tiny_dream)
    assert dream.engine.resolve(SamplingParams()).alg == dream.spec.defaults.get("alg", None)

"""Token-exact parity at temperature 0 with the published algorithms on the same weights.

The oracle (`reference_llada.py`) is an independent re-implementation of ML-GSAI/LLaDA `generate` and of
NVlabs/Fast-dLLM `generate`, `generate_with_prefix_cache`, `generate_with_dual_cache` (threshold and factor
rules), running its own plain-math LLaDA forward (pre-RoPE K/V cache, `replace_position`) on the tensors of
the checkpoint that the runtime loads through its public API.
"""
from __future__ import annotations

import pytest
import torch

from checkpoints import special_token_ids
from dllm import SamplingParams
from reference_llada import (fastdllm_generate, fastdllm_generate_with_dual_cache,
                             fastdllm_generate_with_prefix_cache, llada_generate)

FASTDLLM = {"none": fastdllm_generate, "prefix": fastdllm_generate_with_prefix_cache,
            "dual": fastdllm_generate_with_dual_cache}


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def ids(tiny_llada):
    return special_token_ids(tiny_llada)


# (prompt length, gen_length, block_length, steps): prompts that are and are not block multiples,
# several block sizes, a single block (pure diffusion), fewer steps than tokens.
REFERENCE_CASES = [(8, 32, 8, 32), (13, 32, 4, 16), (11, 24, 24, 24), (5, 32, 16, 8), (16, 16, 2, 16)]


@pytest.mark.parametrize("plen,gen,block,steps", REFERENCE_CASES)
def test_reference_sampler_matches_llada_generate(llm_factory, ref_model, ids, plen, gen, block, steps):
    prompt = prompts([plen])[0]
    want = llada_generate(ref_model, torch.tensor([prompt]), steps=steps, gen_length=gen, block_length=block,
                          mask_id=ids["mask"], eos_id=ids["eos"], eot_id=ids["eot"])[0, plen:].tolist()
    out = llm_factory().generate([prompt], SamplingParams(max_tokens=gen, block_length=block, steps=steps,
                                                          ignore_eos=True))[0]
    assert out.token_ids == want
    assert out.finish_reason == "length"


@pytest.mark.parametrize("flags", [{"logits_eos_inf": True}, {"confidence_eos_eot_inf": True},
                                   {"cfg_scale": 0.7}, {"cfg_scale": 1.5, "confidence_eos_eot_inf": True}])
def test_reference_sampler_options_match_llada_generate(llm_factory, ref_model, ids, flags):
    prompt = prompts([9], seed=3)[0]
    want = llada_generate(ref_model, torch.tensor([prompt]), steps=16, gen_length=16, block_length=8,
                          mask_id=ids["mask"], eos_id=ids["eos"], eot_id=ids["eot"], **flags)[0, 9:].tolist()
    out = llm_factory().generate([prompt], SamplingParams(max_tokens=16, block_length=8, steps=16,
                                                          ignore_eos=True, **flags))[0]
    assert out.token_ids == want


def test_reference_sampler_padded_batch_matches_llada_generate(llm_factory, ref_model, ids):
    """Left-padded batch with the attention mask, as the official batched generate runs it."""
    rows = prompts([5, 12, 9], seed=7)
    width = max(map(len, rows))
    x = torch.tensor([[ids["pad"]] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    want = llada_generate(ref_model, x, attention_mask=mask, steps=32, gen_length=32, block_length=8,
                          mask_id=ids["mask"], eos_id=ids["eos"], eot_id=ids["eot"])[:, width:].tolist()
    outs = llm_factory().generate(rows, SamplingParams(max_tokens=32, block_length=8, steps=32, ignore_eos=True))
    assert [o.token_ids for o in outs] == want


# (prompt length, gen_length, block_length) for the Fast-dLLM paths.
FAST_CASES = [(8, 32, 8), (13, 32, 4), (6, 32, 16), (10, 24, 24)]


# Thresholds at which the tiny model needs several steps per block, so that the caches' stale K/V matters
# (at 0.7 the three caches give different tokens on most prompts).
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("plen,gen,block", FAST_CASES)
@pytest.mark.parametrize("threshold", [0.7, 0.9])
def test_threshold_matches_fastdllm(llm_factory, ref_model, ids, cache, plen, gen, block, threshold):
    batch = prompts([plen, plen], seed=plen)
    want, nfe = FASTDLLM[cache](ref_model, torch.tensor(batch), steps=gen, gen_length=gen, block_length=block,
                                mask_id=ids["mask"], threshold=threshold)
    outs = llm_factory(cache, "threshold").generate(
        batch, SamplingParams(max_tokens=gen, block_length=block, threshold=threshold, ignore_eos=True))
    assert [o.token_ids for o in outs] == want[:, plen:].tolist()
    assert max(o.metrics.nfe for o in outs) == nfe  # a row leaves the batch as soon as it is complete


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("factor", [1.0, 3.0])
def test_factor_matches_fastdllm(llm_factory, ref_model, ids, cache, factor):
    prompt = prompts([11], seed=5)
    want, nfe = FASTDLLM[cache](ref_model, torch.tensor(prompt), steps=32, gen_length=32, block_length=8,
                                mask_id=ids["mask"], factor=factor)
    out = llm_factory(cache, "factor").generate(
        prompt, SamplingParams(max_tokens=32, block_length=8, factor=factor, ignore_eos=True))[0]
    assert out.token_ids == want[0, 11:].tolist()
    assert out.metrics.nfe == nfe


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fixed_steps_with_cache_matches_fastdllm(llm_factory, ref_model, ids, cache):
    """Fast-dLLM's cached functions with threshold=None follow LLaDA's fixed schedule."""
    prompt = prompts([7], seed=11)
    want, nfe = FASTDLLM[cache](ref_model, torch.tensor(prompt), steps=16, gen_length=32, block_length=8,
                                mask_id=ids["mask"])
    out = llm_factory(cache, "reference").generate(
        prompt, SamplingParams(max_tokens=32, block_length=8, steps=16, ignore_eos=True))[0]
    assert out.token_ids == want[0, 7:].tolist()
    assert out.metrics.nfe == nfe


def test_early_stop_keeps_the_reference_tokens(llm_factory, ref_model, ids):
    """A row stops once a stop token is final with nothing masked before it, and the tokens up to it are the
    reference's. The stop token is taken from the reference output, so every case really stops early."""
    for seed in range(4):
        prompt = prompts([10], seed=seed)[0]
        full = llada_generate(ref_model, torch.tensor([prompt]), steps=32, gen_length=32, block_length=4,
                              mask_id=ids["mask"], eos_id=ids["eos"], eot_id=ids["eot"])[0, 10:].tolist()
        stop = full[9 + seed]
        out = llm_factory().generate([prompt], SamplingParams(max_tokens=32, block_length=4, steps=32,
                                                              stop_token_ids=[stop]))[0]
        first = next(i for i, t in enumerate(full) if t in (stop, ids["eos"], ids["eot"]))
        assert out.finish_reason == "stop"
        assert out.token_ids == full[:first + 1]
        assert first + 1 <= out.metrics.nfe < 32  # one token a step: the stop is final after first + 1 steps

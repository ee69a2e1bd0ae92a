"""SDAR: logits, token-exact parity with JetAstra/SDAR's `block_diffusion_generate` on the same weights for every
remasking strategy, and the exactness of the block cache.

Oracle: `reference_sdar.py` (independent re-implementation; `entropy_bounded` follows the EB-Sampler paper, as
the runtime does, because the authors' branch is broken). Settings keep each step's quota at most one token
(steps >= block length): with larger quotas the authors' top-k can pick already-final positions and overwrite
them, which the runtime never does. Seeded runs at temperature > 0 use the same random draws in both.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from checkpoints import load_tiny_state_dict, special_token_ids
from dllm import SamplingParams
from dllm.canvas import Canvas
from dllm.models import load_model
from reference_sdar import RefSDAR, sdar_block_diffusion_generate

STRATEGIES = ["low_confidence_dynamic", "low_confidence_static", "sequential", "entropy_bounded"]


@pytest.fixture(scope="module")
def ref(tiny_sdar):
    cfg, sd = load_tiny_state_dict(tiny_sdar)
    return RefSDAR(cfg, sd)


@pytest.fixture(scope="module")
def ids(tiny_sdar):
    return special_token_ids(tiny_sdar)


def prompt(n, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class _Masked:
    def __init__(self, mask):
        self.attn_mask = mask

    def kv(self, layer, k, v):
        return k, v


def test_logits_match_reference_block_causal(tiny_sdar, ref):
    loaded = load_model(tiny_sdar, device="cpu")
    rows = [prompt(10, 1), prompt(3, 2)]
    canvas = Canvas(rows, max_tokens=8, block_length=4, spec=loaded.spec, device=torch.device("cpu"))
    got = loaded.model(canvas.tokens, canvas.positions, _Masked(canvas.attn_mask(0, canvas.length, canvas.length)))
    for i in range(2):
        pad = int(canvas.gen_starts[i]) - len(rows[i])
        n = canvas.length - pad
        blk = torch.arange(n) // 4
        want, _ = ref(canvas.tokens[i:i + 1, pad:], (blk[:, None] >= blk[None, :])[None], torch.arange(n)[None])
        torch.testing.assert_close(got[i:i + 1, pad:], want, rtol=1e-4, atol=1e-4)


def _reference(ref, ids, p, gen, block, steps, rule, temperature, seed, **kw):
    torch.manual_seed(seed)
    x, _ = sdar_block_diffusion_generate(ref, torch.tensor([p]), ids["mask"], gen_length=gen, block_length=block,
                                         denoising_steps=steps, temperature=temperature, remasking_strategy=rule,
                                         eb_threshold=kw.get("entropy_bound", 0.35),
                                         confidence_threshold=kw.get("threshold", 0.85),
                                         top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0))
    return x[0, len(p):len(p) + gen].tolist()


@pytest.mark.parametrize("rule", STRATEGIES)
@pytest.mark.parametrize("plen,block,temperature", [(8, 4, 0.0), (6, 4, 0.9), (13, 8, 0.0), (5, 8, 1.0)])
def test_block_diffusion_generate_parity(llm_factory, tiny_sdar, ref, ids, rule, plen, block, temperature):
    p, seed = prompt(plen, plen), plen * 7 + block
    extra = {"threshold": 0.3} if rule == "low_confidence_dynamic" else {"entropy_bound": 0.5} if rule == "entropy_bounded" else {}
    want = _reference(ref, ids, p, 24, block, block, rule, temperature, seed, **extra)
    sp = SamplingParams(max_tokens=24, block_length=block, steps=block, remasking=rule, temperature=temperature,
                        top_k=0, top_p=1.0, seed=seed, ignore_eos=True, **extra)
    for cache in ("none", "block"):
        out = llm_factory(cache, path=tiny_sdar).generate([p], sp)[0]
        assert out.token_ids == want, cache


def test_top_k_top_p_parity(llm_factory, tiny_sdar, ref, ids):
    p = prompt(9, 3)
    want = _reference(ref, ids, p, 16, 4, 4, "low_confidence_static", 0.7, 11, top_k=20, top_p=0.9)
    sp = SamplingParams(max_tokens=16, block_length=4, steps=4, remasking="low_confidence_static", temperature=0.7,
                        top_k=20, top_p=0.9, seed=11, ignore_eos=True)
    assert llm_factory("block", path=tiny_sdar).generate([p], sp)[0].token_ids == want


@pytest.mark.parametrize("rule", STRATEGIES)
def test_block_cache_is_exact(llm_factory, tiny_sdar, rule):
    prompts = [prompt(n, n) for n in (3, 8, 11, 14)]
    sp = SamplingParams(max_tokens=20, block_length=4, steps=2, remasking=rule, temperature=0, ignore_eos=True)
    outs = {c: [o.token_ids for o in llm_factory(c, path=tiny_sdar).generate(prompts, sp)]
            for c in ("none", "block", "prefix", "dual")}
    assert outs["block"] == outs["none"] == outs["prefix"] == outs["dual"]


def test_block_cache_writes_each_finished_block_once(tiny_sdar):
    """Which columns each forward computes: the first block's forward prefills the prompt, every later block's
    first forward adds only the block just finished, and in-block steps compute the block alone."""
    from dllm import LLM
    llm = LLM(str(tiny_sdar), cache="block", strategy="reference")
    fed = []
    forward = llm.engine.runner.forward

    def record(ids, positions, plan, logits_index):
        fed.append((plan.start, plan.end, plan.read_end))
        return forward(ids, positions, plan, logits_index)

    llm.engine.runner.forward = record
    llm.generate([prompt(6, 1)], SamplingParams(max_tokens=8, block_length=4, steps=4, remasking="sequential",
                                                temperature=0, ignore_eos=True))
    # prompt 6 tokens: decoded blocks are columns [4, 8) (2 prompt tokens + 2 masks), [8, 12), [12, 16)
    starts = [f for f in fed if f[0] < f[1] - 4 or f[0] == 0]
    assert fed[0] == (0, 8, 8)                  # prefill + first decoded block
    assert (4, 12, 12) in fed and (8, 16, 16) in fed   # previous block stored with the next block's first step
    assert all(end - start == 4 for start, end, _ in fed if (start, end) not in [(0, 8), (4, 12), (8, 16)])
    assert len(starts) == 3


def test_rows_are_independent_of_their_batch(llm_factory, tiny_sdar):
    """Left padding is in whole blocks so every row keeps SDAR's block grid (blocks aligned to position 0)."""
    prompts = [prompt(n, n) for n in (2, 5, 9, 12, 4)]
    sp = SamplingParams(max_tokens=12, block_length=4, steps=4, temperature=0, ignore_eos=True)
    llm = llm_factory("block", path=tiny_sdar)
    alone = [llm.generate([p], sp)[0].token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, sp)] == alone
    sampled = SamplingParams(max_tokens=12, block_length=4, steps=4, temperature=1.0, seed=5, ignore_eos=True)
    alone = [llm.generate([p], sampled)[0].token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, sampled)] == alone


@pytest.mark.parametrize("cache,strategy", list(itertools.product(["none", "prefix", "dual", "block"], ["reference", "threshold", "factor"])))
def test_every_combination_runs(llm_factory, tiny_sdar, cache, strategy):
    out = llm_factory(cache, strategy, path=tiny_sdar).generate(
        [prompt(7), prompt(3)], SamplingParams(max_tokens=10, block_length=4, temperature=0, ignore_eos=True))
    assert all(len(o.token_ids) == 10 for o in out)

"""Dream: logits and token-exact parity with the published samplers on the same weights.

Oracles (`reference_dream.py`, independent re-implementations): Dream-org's `diffusion_generate` (`_sample`)
for every `alg`, and Fast-dLLM's cached Dream path (`generation_utils_block._sample`: prefix cache when
`dual_cache=False`, dual cache when True; the block's first token committed from the block-start forward).
"""
from __future__ import annotations

import pytest
import torch

from checkpoints import load_tiny_state_dict, special_token_ids
from dllm import SamplingParams
from dllm.canvas import Canvas
from dllm.models import load_model
from reference_dream import RefDream, dream_diffusion_generate, fastdllm_dream_block_generate


@pytest.fixture(scope="module")
def ref(tiny_dream):
    cfg, sd = load_tiny_state_dict(tiny_dream)
    return RefDream(cfg, sd)


@pytest.fixture(scope="module")
def ids(tiny_dream):
    return special_token_ids(tiny_dream)


def prompt(n, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class _Full:
    def __init__(self, mask):
        self.attn_mask = mask

    def kv(self, layer, k, v):
        return k, v


def test_logits_match_reference_including_padding(tiny_dream, ref):
    loaded = load_model(tiny_dream, device="cpu")
    rows = [prompt(9, 1), prompt(4, 2)]
    canvas = Canvas(rows, max_tokens=4, block_length=4, spec=loaded.spec, device=torch.device("cpu"))
    got = loaded.model(canvas.tokens, canvas.positions, _Full(canvas.attn_mask(0, canvas.length, canvas.length)))
    for i, row in enumerate(rows):
        pad = canvas.gen_start - len(row)
        want, _ = ref(canvas.tokens[i:i + 1, pad:])
        torch.testing.assert_close(got[i:i + 1, pad:], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("plen,gen,steps", [(7, 16, 16), (12, 24, 8)])
def test_diffusion_generate_parity(llm_factory, tiny_dream, ref, ids, alg, plen, gen, steps):
    p = prompt(plen, plen)
    want = dream_diffusion_generate(ref, torch.tensor([p]), max_new_tokens=gen, steps=steps, alg=alg,
                                    mask_token_id=ids["mask"])[0, plen:].tolist()
    out = llm_factory(path=tiny_dream).generate(
        [p], SamplingParams(max_tokens=gen, steps=steps, alg=alg, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == want
    assert out.metrics.nfe == steps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_origin_parity_with_seed(llm_factory, tiny_dream, ref, ids, seed):
    """`origin` transfers random positions even at temperature 0; the same seed gives the same draws."""
    p = prompt(6, seed)
    torch.manual_seed(seed)
    want = dream_diffusion_generate(ref, torch.tensor([p]), max_new_tokens=16, steps=8, alg="origin",
                                    mask_token_id=ids["mask"])[0, 6:].tolist()
    out = llm_factory(path=tiny_dream).generate(
        [p], SamplingParams(max_tokens=16, steps=8, alg="origin", temperature=0, seed=seed, ignore_eos=True))[0]
    assert out.token_ids == want


def test_padded_batch_parity(llm_factory, tiny_dream, ref, ids):
    rows = [prompt(5, 3), prompt(11, 4), prompt(8, 5)]
    width = max(map(len, rows))
    x = torch.tensor([[ids["eos"]] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    want = dream_diffusion_generate(ref, x, attention_mask=mask, max_new_tokens=16, steps=16, alg="entropy",
                                    mask_token_id=ids["mask"])[:, width:].tolist()
    outs = llm_factory(path=tiny_dream).generate(
        rows, SamplingParams(max_tokens=16, steps=16, alg="entropy", temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("plen,block,threshold", [(8, 8, 0.5), (13, 4, 0.7), (5, 16, 0.6)])
def test_fastdllm_cached_threshold_parity(llm_factory, tiny_dream, ref, ids, cache, plen, block, threshold):
    p = prompt(plen, plen + block)
    want, nfe = fastdllm_dream_block_generate(ref, torch.tensor([p]), max_new_tokens=32, steps=32, block_length=block,
                                              threshold=threshold, dual_cache=cache == "dual", mask_token_id=ids["mask"])
    out = llm_factory(cache, "threshold", path=tiny_dream).generate(
        [p], SamplingParams(max_tokens=32, block_length=block, threshold=threshold, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == want[0, plen:].tolist()
    assert out.metrics.nfe == nfe


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fastdllm_cached_schedule_parity(llm_factory, tiny_dream, ref, ids, cache):
    """The non-threshold branch of the cached path (Fast-dLLM reads every alg as entropy; use entropy)."""
    p = prompt(9, 42)
    want, nfe = fastdllm_dream_block_generate(ref, torch.tensor([p]), max_new_tokens=32, steps=16, block_length=8,
                                              alg="entropy", dual_cache=cache == "dual", mask_token_id=ids["mask"])
    out = llm_factory(cache, "reference", path=tiny_dream).generate(
        [p], SamplingParams(max_tokens=32, block_length=8, steps=16, alg="entropy", temperature=0, ignore_eos=True))[0]
    assert out.token_ids == want[0, 9:].tolist()
    assert out.metrics.nfe == nfe


def test_caches_are_approximate_but_refresh_at_block_start(llm_factory, tiny_dream):
    """Without a cache the first token of a block is not forced: outputs may differ from the cached paths,
    but every cache fills every position."""
    p = prompt(10, 7)
    for cache in ("none", "prefix", "dual"):
        out = llm_factory(cache, "threshold", path=tiny_dream).generate(
            [p], SamplingParams(max_tokens=16, block_length=8, threshold=0.6, temperature=0, ignore_eos=True))[0]
        assert len(out.token_ids) == 16


@pytest.mark.parametrize("cache,strategy", [(c, s) for c in ("none", "prefix", "dual") for s in ("reference", "threshold", "factor")])
def test_every_combination_runs_and_rows_are_batch_independent(llm_factory, tiny_dream, cache, strategy):
    llm = llm_factory(cache, strategy, path=tiny_dream)
    rows = [prompt(7, 1), prompt(3, 2), prompt(12, 3)]
    sp = SamplingParams(max_tokens=16, block_length=8, temperature=0, ignore_eos=True,
                        **({"alg": "entropy"} if strategy == "reference" else {}))
    together = [o.token_ids for o in llm.generate(rows, sp)]
    assert all(len(t) == 16 for t in together)
    if cache == "none":  # the cached paths are approximate; exact batch independence is a property of none
        assert together == [llm.generate([r], sp)[0].token_ids for r in rows]

"""FreeCache (`cache="freecache"`) against the independent oracle `reference_freecache.py` (itself run against the
authors' code, ZhanqiuHu/flash-dlm-experimental@387beab): the same tokens at temperature 0, the same NFE, and the
same fed range at every step (the frozen prefix grows at block ends, never refreshed)."""
from __future__ import annotations

import pytest
import torch

from checkpoints import load_tiny_state_dict, special_token_ids
from dllm import LLM, SamplingParams
from dllm.errors import InvalidParameterError
from reference_dream import RefDream
from reference_freecache import freecache_dream_generate, freecache_llada_generate
from reference_llada import RefLLaDA

_BUILT: dict = {}


def llm(path, strategy="reference") -> LLM:
    key = (str(path), strategy)
    if key not in _BUILT:
        _BUILT[key] = LLM(str(path), cache="freecache", strategy=strategy, device="cpu", dtype="float32")
    return _BUILT[key]


def prompt(n, seed=0):
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def fed(monkeypatch):
    """The (start, end) column range fed by every forward of a freecache run."""
    from dllm.cache.freecache import FreeCache
    ranges: list[tuple[int, int]] = []
    original = FreeCache.plan

    def plan(policy, start, end, step, mask):
        p = original(policy, start, end, step, mask)
        ranges.append((p.start, p.end))
        return p
    monkeypatch.setattr(FreeCache, "plan", plan)
    return ranges


@pytest.mark.parametrize("plen,gen,block,steps", [(5, 8, 4, 8), (7, 32, 8, 32), (12, 32, 16, 16), (9, 24, 24, 24),
                                                  (6, 16, 4, 8)])
def test_llada_matches_the_oracle(tiny_llada, fed, plen, gen, block, steps):
    cfg, sd = load_tiny_state_dict(tiny_llada)
    ids = special_token_ids(tiny_llada)
    p = prompt(plen, seed=plen * gen)
    x, nfe, log = freecache_llada_generate(RefLLaDA(cfg, sd), torch.tensor([p]), steps=steps, gen_length=gen,
                                           block_length=block, mask_id=ids["mask"])
    out = llm(tiny_llada).generate([p], SamplingParams(max_tokens=gen, block_length=block, steps=steps,
                                                       ignore_eos=True))[0]
    assert out.token_ids == x[0, plen:].tolist()
    assert out.metrics.nfe == nfe
    assert fed == [tuple(e["fed"]) for e in log]
    assert out.metrics.kv_computations == cfg["n_layers"] * sum(b - a for a, b in fed)


@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy", "topk_margin"])
def test_dream_one_block_matches_the_oracle(tiny_dream, fed, alg):
    cfg, sd = load_tiny_state_dict(tiny_dream)
    ids = special_token_ids(tiny_dream)
    p = prompt(7, seed=3)
    x, nfe, log = freecache_dream_generate(RefDream(cfg, sd), torch.tensor([p]), 16, ids["mask"], steps=16,
                                           block_size=16, alg=alg)
    out = llm(tiny_dream).generate([p], SamplingParams(max_tokens=16, block_length=16, steps=16, alg=alg,
                                                       temperature=0, ignore_eos=True))[0]
    assert out.token_ids == x[0, 7:].tolist()
    assert out.metrics.nfe == nfe
    assert fed == [tuple(e["fed"]) for e in log]


def test_dream_hand_schedule(tiny_dream, fed):
    """prompt 5, gen 8, blocks of 4, steps 8: [0, 13), then [4, 13) x 3, then [8, 13) x 4 (the note's table)."""
    llm(tiny_dream).generate([prompt(5, 1)], SamplingParams(max_tokens=8, block_length=4, steps=8, alg="maskgit_plus",
                                                            temperature=0, ignore_eos=True))
    assert fed == [(0, 13)] + [(4, 13)] * 3 + [(8, 13)] * 4


@pytest.mark.parametrize("family,strategy", [("llada", "reference"), ("llada", "threshold"), ("dream", "threshold")])
def test_batched_rows_equal_their_runs_alone(tiny_llada, tiny_dream, family, strategy):
    path = tiny_llada if family == "llada" else tiny_dream
    params = SamplingParams(max_tokens=16, block_length=8, ignore_eos=True, temperature=0,
                            **({"threshold": 0.05} if strategy == "threshold" else {"steps": 16}))
    prompts = [prompt(n, seed=n) for n in (4, 9, 6)]
    engine = llm(path, strategy)
    for p, out in zip(prompts, engine.generate(prompts, params)):
        assert out.token_ids == engine.generate([p], params)[0].token_ids


def test_refused(tiny_llada, tiny_sdar):
    with pytest.raises(InvalidParameterError, match="full attention"):
        LLM(str(tiny_sdar), cache="freecache", device="cpu", strategy="reference")
    with pytest.raises(InvalidParameterError, match="cfg_scale"):
        llm(tiny_llada).generate(["hi"], SamplingParams(max_tokens=8, block_length=8, cfg_scale=1.0))

"""dKV-Cache (`cache="dkv"`) against the independent oracle `reference_dkv.py` (itself checked against the authors'
code at horseee/dKV-Cache@49a76fc): the same tokens at temperature 0, the same NFE, and the same positions fed
at every step; the token x layer count follows from the fed sets; batched rows equal their runs alone."""
from __future__ import annotations

import pytest
import torch

from checkpoints import load_tiny_state_dict, special_token_ids
from dllm import LLM, SamplingParams
from dllm.errors import InvalidParameterError
from reference_dkv import DkvDream, DkvLLaDA, dkv_dream_generate, dkv_llada_decode_generate

_BUILT: dict = {}


def llm(path, **options) -> LLM:
    key = (str(path), tuple(sorted(options.items())))
    if key not in _BUILT:
        _BUILT[key] = LLM(str(path), cache="dkv", cache_options=options, device="cpu", dtype="float32", strategy="reference")
    return _BUILT[key]


def prompt(n, seed=0):
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class FedRecorder:
    """Records, for every forward of a dkv run, the set of canvas columns fed (row 0)."""

    def __init__(self, monkeypatch):
        from dllm.cache.dkv import DKVCache
        self.fed: list[set[int]] = []
        original = DKVCache.plan

        def plan(policy, start, end, step, mask):
            p = original(policy, start, end, step, mask)
            if p.index is None:
                self.fed.append(set(range(p.start, p.end)))
            else:
                n = len(p.index[0]) if p.kv_computations is None else int(p.kv_computations[0]) // len(p.buffers.k)
                self.fed.append(set(p.index[0, :n].tolist()))
            return p
        monkeypatch.setattr(DKVCache, "plan", plan)


@pytest.fixture(scope="module")
def llada(tiny_llada):
    cfg, sd = load_tiny_state_dict(tiny_llada)
    return tiny_llada, DkvLLaDA(cfg, sd), special_token_ids(tiny_llada)


@pytest.fixture(scope="module")
def dream(tiny_dream):
    cfg, sd = load_tiny_state_dict(tiny_dream)
    return tiny_dream, DkvDream(cfg, sd), special_token_ids(tiny_dream)


@pytest.mark.parametrize("plen,gen,block,steps,n", [(5, 8, 4, 8, 8), (5, 8, 4, 8, 2), (7, 32, 8, 32, 3),
                                                    (12, 32, 16, 16, 8), (9, 24, 24, 24, 4)])
def test_llada_decode_matches_the_oracle(llada, monkeypatch, plen, gen, block, steps, n):
    path, oracle, ids = llada
    p = prompt(plen, seed=plen + gen)
    x, nfe, log = dkv_llada_decode_generate(oracle, torch.tensor([p]), steps=steps, gen_length=gen, block_length=block,
                                            mask_id=ids["mask"], enable_cache=True, cache_reloading_step=n)
    rec = FedRecorder(monkeypatch)
    out = llm(path, refresh_interval=n).generate([p], SamplingParams(max_tokens=gen, block_length=block, steps=steps,
                                                                     ignore_eos=True))[0]
    assert out.token_ids == x[0, plen:].tolist()
    assert out.metrics.nfe == nfe
    assert rec.fed == [set(r["fed"][0]) for r in log]
    layers = oracle.n_layers
    assert out.metrics.kv_computations == layers * sum(len(r["fed"][0]) for r in log)


def test_llada_hand_schedule(llada, monkeypatch):
    """prompt 5, gen 8, block 4, steps 8, N = 8 (the note's §6.1): fed 13 13 7 6 | 13 13 3 2."""
    path, _, _ = llada
    rec = FedRecorder(monkeypatch)
    out = llm(path, refresh_interval=8).generate([prompt(5, 1)], SamplingParams(max_tokens=8, block_length=4, steps=8,
                                                                               ignore_eos=True))[0]
    assert [len(f) for f in rec.fed] == [13, 13, 7, 6, 13, 13, 3, 2]
    assert out.metrics.kv_computations_per_step == [2 * n for n in (13, 13, 7, 6, 13, 13, 3, 2)]   # 2 layers
    assert out.metrics.kv_computations == 2 * (13 + 13 + 7 + 6 + 13 + 13 + 3 + 2)
    assert out.metrics.kv_fraction == pytest.approx(out.metrics.kv_computations / (8 * 13 * 2))


@pytest.mark.parametrize("variant,n,alg", [("decode", 4, "maskgit_plus"), ("decode", 2, "entropy"),
                                           ("decode", 3, "topk_margin"), ("prefill", 4, "maskgit_plus"),
                                           ("pd", 4, "maskgit_plus"), ("pd", 3, "entropy")])
def test_dream_matches_the_oracle(dream, monkeypatch, variant, n, alg):
    path, oracle, ids = dream
    plen, gen = 6, 16
    p = prompt(plen, seed=11)
    cache_type = {"decode": "decoded", "prefill": "prefill", "pd": "pd"}[variant]
    x, nfe, log = dkv_dream_generate(oracle, torch.tensor([p]), max_new_tokens=gen, steps=gen, alg=alg,
                                     mask_token_id=ids["mask"], use_cache=True, cache_type=cache_type,
                                     cache_steps=n, shift_type="un")
    rec = FedRecorder(monkeypatch)
    out = llm(path, variant=variant, refresh_interval=n).generate(
        [p], SamplingParams(max_tokens=gen, block_length=gen, steps=gen, alg=alg, ignore_eos=True))[0]
    assert out.token_ids == x[0, plen:].tolist()
    assert out.metrics.nfe == nfe
    assert rec.fed == [set(r["fed"][0]) for r in log]


def test_dream_hand_schedule(dream, monkeypatch):
    """prompt 5, gen 8, steps 8, N = 4, maskgit_plus (the note's §6.3): fed 13 9 8 7 13 5 4 3."""
    path, _, _ = dream
    rec = FedRecorder(monkeypatch)
    llm(path, refresh_interval=4).generate([prompt(5, 2)], SamplingParams(max_tokens=8, block_length=8, steps=8,
                                                                         alg="maskgit_plus", ignore_eos=True))
    assert [len(f) for f in rec.fed] == [13, 9, 8, 7, 13, 5, 4, 3]
    assert rec.fed[1] == set(range(4, 13))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_refresh_every_step_equals_no_cache(llada, dream, family):
    path, _, _ = llada if family == "llada" else dream
    p = prompt(9, 5)
    extra = {"alg": "maskgit_plus"} if family == "dream" else {}   # Dream's default `origin` order is random
    params = SamplingParams(max_tokens=16, block_length=8, steps=16, ignore_eos=True, temperature=0, **extra)
    want = LLM(str(path), device="cpu", dtype="float32", strategy="reference").generate([p], params)[0]  # same dtype as llm()
    got = llm(path, refresh_interval=1).generate([p], params)[0]
    assert got.token_ids == want.token_ids
    assert got.metrics.kv_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("family,strategy", [("llada", "reference"), ("llada", "threshold"), ("dream", "reference"),
                                             ("dream", "threshold")])
def test_batched_rows_equal_their_runs_alone(llada, dream, family, strategy):
    """Rows of different prompt lengths (left padding) feed different numbers of positions per step. (Their
    token x layer counts differ from the runs alone: a full forward also computes the batch's padding.)"""
    path = (llada if family == "llada" else dream)[0]
    engine = LLM(str(path), cache="dkv", strategy=strategy, device="cpu", dtype="float32")
    extra = {"threshold": 0.05} if strategy == "threshold" else {"steps": 16}
    if family == "dream" and strategy == "reference":
        extra["alg"] = "maskgit_plus"   # Dream's default `origin` order is random
    params = SamplingParams(max_tokens=16, block_length=8, ignore_eos=True, temperature=0, **extra)
    prompts = [prompt(n, seed=n) for n in (4, 9, 6)]
    batched = engine.generate(prompts, params)
    for p, out in zip(prompts, batched):
        alone = engine.generate([p], params)[0]
        assert out.token_ids == alone.token_ids


def test_bad_options_and_models_are_refused(llada, tiny_sdar):
    path = llada[0]
    with pytest.raises(InvalidParameterError, match="variant"):
        LLM(str(path), cache="dkv", cache_options={"variant": "greedy"}, device="cpu", strategy="reference").generate(
            ["hi"], SamplingParams(max_tokens=8, block_length=8))
    with pytest.raises(InvalidParameterError, match="no option 'window'"):
        LLM(str(path), cache="dkv", cache_options={"window": 2}, device="cpu", strategy="reference")
    with pytest.raises(InvalidParameterError, match="cfg_scale"):
        llm(path).generate(["hi"], SamplingParams(max_tokens=8, block_length=8, cfg_scale=1.0))
    with pytest.raises(InvalidParameterError, match="full attention"):
        LLM(str(tiny_sdar), cache="dkv", device="cpu", strategy="reference")


@pytest.mark.parametrize("plen,gen,block,steps,n,window", [(5, 8, 4, 8, 2, 2), (5, 8, 4, 8, 2, 0), (7, 32, 8, 32, 2, 4),
                                                           (6, 16, 16, 16, 3, 4), (9, 24, 8, 24, 4, 2)])
def test_llada_greedy_matches_the_oracle(llada, monkeypatch, plen, gen, block, steps, n, window):
    """The unmasking order of each block is one torch.rand draw, from the policy's generator seeded by `seed`,
    as the oracle draws it from the global generator after torch.manual_seed(seed)."""
    from reference_dkv import dkv_llada_greedy_generate
    path, oracle, ids = llada
    p = prompt(plen, seed=plen + gen)
    torch.manual_seed(7)
    x, nfe, log = dkv_llada_greedy_generate(oracle, torch.tensor([p]), steps=steps, gen_length=gen,
                                            block_length=block, mask_id=ids["mask"], remasking="random",
                                            enable_cache=True, cache_reloading_step=n, window_size=window)
    rec = FedRecorder(monkeypatch)
    out = llm(path, variant="greedy", refresh_interval=n, window_size=window, seed=7).generate(
        [p], SamplingParams(max_tokens=gen, block_length=block, steps=steps, remasking="random", temperature=0,
                            ignore_eos=True))[0]
    assert out.token_ids == x[0, plen:].tolist()
    assert out.metrics.nfe == nfe
    assert rec.fed == [set(r["fed"][0]) for r in log]


def test_llada_greedy_hand_schedule(llada, monkeypatch):
    """The note's §6.2: N = 2, window 2: fed 13 4 13 4 | 13 4 13 2."""
    path, _, _ = llada
    rec = FedRecorder(monkeypatch)
    llm(path, variant="greedy", refresh_interval=2, window_size=2).generate(
        [prompt(5, 1)], SamplingParams(max_tokens=8, block_length=4, steps=8, remasking="random", ignore_eos=True))
    assert [len(f) for f in rec.fed] == [13, 4, 13, 4, 13, 4, 13, 2]


def test_greedy_needs_random_remasking_and_llada(llada, dream):
    with pytest.raises(InvalidParameterError, match="remasking='random'"):
        llm(llada[0], variant="greedy").generate(["hi"], SamplingParams(max_tokens=8, block_length=8, steps=8))
    with pytest.raises(InvalidParameterError, match="LLaDA models only"):
        llm(dream[0], variant="greedy").generate(["hi"], SamplingParams(max_tokens=8, block_length=8, steps=8))


def test_greedy_rows_of_equal_width_are_batch_independent(llada):
    engine = llm(llada[0], variant="greedy", window_size=2)
    params = SamplingParams(max_tokens=16, block_length=8, steps=16, remasking="random", ignore_eos=True)
    prompts = [prompt(6, seed=s) for s in (1, 2, 3)]
    for p, out in zip(prompts, engine.generate(prompts, params)):
        assert out.token_ids == engine.generate([p], params)[0].token_ids

"""Self-checks of the dKV-Cache oracle (`reference_dkv.py`) on the tiny checkpoints.

- the subset forward equals the plain forward when the cached K/V are fresh;
- with the cache off (or refreshed every step) each variant equals the uncached oracle token for token;
- the logged schedules equal the hand-computed ones of docs/notes/dkv.md §6 (prompt 5, gen 8, block 4,
  steps 8), written here from the rule, independently of the oracle's own bookkeeping.
(The oracle was also run against the authors' code at 49a76fc on the same weights; see the note, §8.)
"""
from __future__ import annotations

import pytest
import torch
from checkpoints import load_tiny_state_dict, special_token_ids
from reference_dkv import (
    DkvDream,
    DkvLLaDA,
    dkv_dream_generate,
    dkv_llada_decode_generate,
    dkv_llada_greedy_generate,
    find_window_tokens,
)
from reference_dream import RefDream, dream_diffusion_generate
from reference_llada import RefLLaDA, llada_generate

P, GEN, BLOCK, STEPS = 5, 8, 4, 8          # the hand-schedule setting: L = 13, blocks [5, 9) and [9, 13)
L = P + GEN


@pytest.fixture(scope="module")
def llada(tiny_llada):
    cfg, sd = load_tiny_state_dict(tiny_llada)
    return DkvLLaDA(cfg, sd), RefLLaDA(cfg, sd), special_token_ids(tiny_llada)


@pytest.fixture(scope="module")
def dream(tiny_dream):
    cfg, sd = load_tiny_state_dict(tiny_dream)
    return DkvDream(cfg, sd), RefDream(cfg, sd), special_token_ids(tiny_dream)


def prompts(b, n, seed=0, high=250):
    return torch.randint(0, high, (b, n), generator=torch.Generator().manual_seed(seed))


def col(log, key, row=0):
    return [set(r[key][row]) for r in log]


# --------------------------------------------------------------------------- forward

def test_forward_fed_equals_full_forward(llada, dream):
    for model, ref, ids in (llada, dream):
        x = prompts(2, L, 3)
        x[:, P:] = ids["mask"]
        x[:, 7] = 11
        want, present = ref(x)
        logits, used = model.forward_fed(x, torch.ones_like(x, dtype=torch.bool))
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
        fed = torch.zeros_like(x, dtype=torch.bool)
        fed[:, [4, 6, 9, 12]] = True                     # any subset, fresh cache -> the same logits
        logits, used2 = model.forward_fed(x, fed, used)
        torch.testing.assert_close(logits, want[:, [4, 6, 9, 12]], rtol=0, atol=1e-5)
        for (k, v), (k2, v2) in zip(present, used2):
            torch.testing.assert_close(k2, k, rtol=0, atol=1e-5)
            torch.testing.assert_close(v2, v, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- LLaDA Decode

@pytest.mark.parametrize("gen,block,steps", [(8, 4, 8), (16, 8, 8)])
def test_llada_decode_uncached_equals_llada_generate(llada, gen, block, steps):
    model, ref, ids = llada
    prompt = prompts(2, P, 1)
    want = llada_generate(ref, prompt, steps=steps, gen_length=gen, block_length=block, mask_id=ids["mask"])
    for kw in ({"enable_cache": False}, {"enable_cache": True, "cache_reloading_step": 1}):
        got, nfe, log = dkv_llada_decode_generate(model, prompt, steps=steps, gen_length=gen, block_length=block,
                                                  mask_id=ids["mask"], **kw)
        assert torch.equal(got, want) and nfe == steps
        assert all(r["kind"] == "full" for r in log)


def _llada_decode_expected(log, n):
    """The rule: block-local i; full iff i <= 1 or i % n == 0; else fed = still MASK after step i-2.
    After a forward with i >= 1 the cache holds the positions decoded up to step i-1 (prompt included)."""
    decoded = set(range(P))
    history = []                                         # non-MASK sets after each step of the block
    out = []
    for r in log:
        i, b = r["i"], r["block"]
        if i == 0:
            decoded |= set(range(P, P + b * BLOCK))      # earlier blocks are complete
            history = []
        full = i <= 1 or i % n == 0
        fed = set(range(L)) if full else set(range(L)) - history[i - 2]
        cache_out = history[i - 1] if i >= 1 else set()
        decoded |= set(r["committed"][0])
        history.append(set(decoded))
        out.append(("full" if full else "cached", fed, cache_out))
    return out


@pytest.mark.parametrize("n", [2, 3, 8])
def test_llada_decode_schedule(llada, n):
    model, _, ids = llada
    _, nfe, log = dkv_llada_decode_generate(model, prompts(1, P, 2), steps=STEPS, gen_length=GEN,
                                            block_length=BLOCK, mask_id=ids["mask"], enable_cache=True,
                                            cache_reloading_step=n)
    assert nfe == STEPS and [len(r["committed"][0]) for r in log] == [1] * 8
    assert [(r["kind"], set(r["fed"][0]), set(r["cache_out"][0])) for r in log] == _llada_decode_expected(log, n)
    for r in log:
        if r["kind"] == "cached":                        # the cache supplies exactly what is not fed
            assert set(r["cache_in"][0]) == set(range(L)) - set(r["fed"][0])
    if n == 8:                                           # the hand schedule of the note (§6.1)
        assert [r["kind"] for r in log] == ["full", "full", "cached", "cached"] * 2
        assert [len(r["fed"][0]) for r in log] == [13, 13, 7, 6, 13, 13, 3, 2]
        d = [r["committed"][0][0] for r in log]
        assert set(log[2]["fed"][0]) == set(range(5, 13)) - {d[0]}
        assert set(log[3]["fed"][0]) == set(range(5, 13)) - {d[0], d[1]}
        assert set(log[6]["fed"][0]) == set(range(9, 13)) - {d[4]}
        assert set(log[7]["fed"][0]) == set(range(9, 13)) - {d[4], d[5]}
        assert [len(r["cache_out"][0]) for r in log] == [0, 6, 7, 8, 0, 10, 11, 12]
        # delayed caching: a token decoded at step t is fed at t+1 and read from the cache from t+2 on
        for t in (2, 3, 6, 7):
            assert d[t - 1] in log[t]["fed"][0] and d[t - 2] not in log[t]["fed"][0]


# --------------------------------------------------------------------------- LLaDA Greedy

def test_find_window_tokens_by_hand():
    masked = torch.zeros(13, dtype=torch.bool)
    masked[5:] = True
    w = torch.zeros(13, dtype=torch.bool)
    w[8] = True
    assert find_window_tokens(w, [8], masked, 2).nonzero().flatten().tolist() == [7, 8, 9]
    w = torch.zeros(13, dtype=torch.bool)
    w[5] = True                                           # left side is prompt: right pointer takes all four
    assert find_window_tokens(w, [5], masked, 4).nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    w = torch.zeros(13, dtype=torch.bool)
    w[[11, 12]] = True                                    # only 10, 9, 8 ... to the left, alternating turns
    assert find_window_tokens(w, [12], masked, 3).nonzero().flatten().tolist() == [8, 9, 10, 11, 12]
    w = torch.zeros(13, dtype=torch.bool)
    w[[6, 7]] = True                                      # window larger than what is left: stops at the edges
    assert find_window_tokens(w, [7], masked, 20).nonzero().flatten().tolist() == list(range(5, 13))


def test_llada_greedy_uncached_equals_random_order_llada(llada):
    model, ref, ids = llada
    prompt = prompts(2, P, 4)
    torch.manual_seed(7)
    want = prompt.new_full((2, L), ids["mask"])
    want[:, :P] = prompt
    for b in range(2):                                   # order drawn once per block, one token per step
        s, e = P + b * BLOCK, P + (b + 1) * BLOCK
        score = torch.rand((2, L))
        score[:, e:], score[:, :s] = float("-inf"), float("-inf")
        order = torch.sort(score, descending=True).indices
        for i in range(BLOCK):
            x0 = ref(want)[0].argmax(-1)
            for row in range(2):
                want[row, order[row, i]] = x0[row, order[row, i]]
    for kw in ({"enable_cache": False}, {"enable_cache": True, "cache_reloading_step": 1}):
        torch.manual_seed(7)
        got, nfe, _ = dkv_llada_greedy_generate(model, prompt, steps=STEPS, gen_length=GEN, block_length=BLOCK,
                                                remasking="random", mask_id=ids["mask"], **kw)
        assert torch.equal(got, want) and nfe == STEPS
    with pytest.raises(NotImplementedError):             # the authors' default remasking is not supported
        dkv_llada_greedy_generate(model, prompt, steps=STEPS, gen_length=GEN, block_length=BLOCK, mask_id=ids["mask"])


def test_llada_greedy_schedule(llada):
    model, _, ids = llada
    torch.manual_seed(5)
    _, _nfe, log = dkv_llada_greedy_generate(model, prompts(1, P, 5), steps=STEPS, gen_length=GEN,
                                            block_length=BLOCK, remasking="random", mask_id=ids["mask"],
                                            enable_cache=True, cache_reloading_step=2, window_size=2)
    assert [r["kind"] for r in log] == ["full", "cached"] * 4
    assert [len(r["fed"][0]) for r in log] == [13, 4, 13, 4, 13, 4, 13, 2]   # note §6.2
    d = [r["committed"][0][0] for r in log]
    masked = set(range(P, L))
    for t, r in enumerate(log):
        if r["kind"] == "cached":
            # fed = decoded at t-1, to decode at t, and the 2 nearest MASKs of the latter (alternating L/R)
            base = {d[t - 1], d[t]}
            m = torch.tensor([p in masked for p in range(L)])
            w = torch.zeros(L, dtype=torch.bool)
            w[list(base)] = True
            find_window_tokens(w, [d[t]], m, 2)
            assert set(r["fed"][0]) == set(w.nonzero().flatten().tolist())
            assert set(r["cache_in"][0]) == set(range(L)) - set(r["fed"][0])
        assert set(r["cache_out"][0]) == set(range(L))
        masked.discard(d[t])
    # window wider than the canvas: the fed set is Decode's (decoded at t-1 + still MASK after t-1)
    torch.manual_seed(5)
    _, _, log = dkv_llada_greedy_generate(model, prompts(1, P, 5), steps=STEPS, gen_length=GEN,
                                          block_length=BLOCK, remasking="random", mask_id=ids["mask"],
                                          enable_cache=True, cache_reloading_step=4, window_size=L)
    masked = set(range(P, L))
    for t, r in enumerate(log):
        if r["kind"] == "cached":
            assert set(r["fed"][0]) == masked | {d[t - 1]}
        masked -= set(r["committed"][0])


# --------------------------------------------------------------------------- Dream

@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy"])
def test_dream_uncached_equals_dream_generate(dream, alg):
    model, ref, ids = dream
    prompt = prompts(2, 6, 3, high=256)
    am = torch.ones_like(prompt)
    am[1, :2] = 0
    prompt[1, :2] = ids["eos"]
    for mask in (None, am):                              # plain and left-padded batches
        want = dream_diffusion_generate(ref, prompt, attention_mask=mask, max_new_tokens=12, steps=6, alg=alg,
                                        mask_token_id=ids["mask"])
        for kw in ({}, {"use_cache": True, "cache_type": "decoded", "cache_steps": 1, "shift_type": "un"}):
            got, nfe, log = dkv_dream_generate(model, prompt, attention_mask=mask, max_new_tokens=12, steps=6,
                                               alg=alg, mask_token_id=ids["mask"], **kw)
            assert torch.equal(got, want) and nfe == 6 and all(r["kind"] == "full" for r in log)


def _shift_un(decoded):
    """Cacheable set of shift_type 'un': p iff p+1 decoded; the last position iff position 0 is (a roll)."""
    return {p for p in range(L - 1) if p + 1 in decoded} | ({L - 1} if 0 in decoded else set())


def test_dream_decoded_schedule(dream):
    model, _, ids = dream
    _, nfe, log = dkv_dream_generate(model, prompts(1, P, 6, high=256), max_new_tokens=GEN, steps=STEPS,
                                     alg="maskgit_plus", mask_token_id=ids["mask"], use_cache=True,
                                     cache_type="decoded", cache_steps=4, shift_type="un")
    assert nfe == STEPS
    assert [r["kind"] for r in log] == ["full", "cached", "cached", "cached"] * 2
    assert [len(r["committed"][0]) for r in log] == [0, 1, 1, 1, 1, 1, 1, 2]   # int(n (1 - s/t)), eps 1e-3
    init = set(range(P - 1))                             # before step 0: p iff p+1 in the prompt (no roll)
    decoded, S = set(range(P)), []                       # S[k] = cacheable set after step k
    for i, r in enumerate(log):
        prev2 = init if i == 1 else (S[i - 2] if i >= 2 else None)
        fed = set(range(L)) if i % 4 == 0 else set(range(L)) - prev2
        assert set(r["fed"][0]) == fed
        assert set(r["cache_out"][0]) == (init if i == 0 else S[i - 1])
        decoded |= set(r["committed"][0])
        S.append(_shift_un(decoded))
    assert set(log[1]["fed"][0]) == set(range(P - 1, L))                         # note §6.3
    assert [len(r["fed"][0]) for r in log][:3] == [13, 9, 8]


def test_dream_prefill_and_pd(dream):
    model, _, ids = dream
    kw = {"max_new_tokens": GEN, "steps": STEPS, "alg": "entropy", "mask_token_id": ids["mask"], "use_cache": True,
              "shift_type": "un"}
    prompt = prompts(1, P, 8, high=256)
    x_pf, _, log_pf = dkv_dream_generate(model, prompt, cache_type="prefill", **kw)
    assert [set(r["fed"][0]) for r in log_pf] == [set(range(L))] + [set(range(P - 1, L))] * (STEPS - 1)
    assert all(set(r["cache_out"][0]) == set(range(P - 1)) for r in log_pf)      # frozen after step 0
    x_pd1, _, log_pd1 = dkv_dream_generate(model, prompt, cache_type="pd", cache_steps=1, **kw)
    assert torch.equal(x_pd1, x_pf) and col(log_pd1, "fed") == col(log_pf, "fed")
    _, _, log = dkv_dream_generate(model, prompt, cache_type="pd", cache_steps=4, **kw)
    decoded, S = set(range(P)), []
    for i, r in enumerate(log):
        if i == 0:
            fed = set(range(L))
        elif i % 4 == 0:
            fed = set(range(P - 1, L))                  # refresh: everything but the frozen prompt prefix
        else:
            fed = set(range(L)) - (set(range(P - 1)) if i == 1 else S[i - 2])
        assert set(r["fed"][0]) == fed and r["refresh"] == (i % 4 == 0)
        decoded |= set(r["committed"][0])
        S.append(_shift_un(decoded))

"""Self-checks of the FlashDLM oracle (`reference_freecache.py`): FreeCache for Dream / LLaDA and Guided Diffusion.

- with the cache off (a full forward every step) the FreeCache samplers equal the existing uncached oracles;
- the logged forward / freeze schedule equals the hand-computed one of docs/notes/freecache.md §6;
- guided decoding at temperature 0: a guide that always agrees commits every MASK in one diffusion step, a guide
  that never agrees commits exactly one token per step (the diffusion draft in 'assisted' mode, the AR's own
  token in 'speculative' mode), a guide agreeing on k drafts commits k ('assisted', at least 1) or k + 1.
(The oracle was also run against the authors' code, transformers 4.46 / 4.52: identical tokens; see the note.)
"""
from __future__ import annotations

import pytest
import torch
from checkpoints import load_tiny_state_dict, special_token_ids
from reference_dream import RefDream, dream_diffusion_generate, shift_logits
from reference_freecache import (
    freecache_dream_generate,
    freecache_llada_generate,
    guided_generate,
)
from reference_llada import RefLLaDA, llada_generate


@pytest.fixture(scope="module")
def dream(tiny_dream):
    cfg, sd = load_tiny_state_dict(tiny_dream)
    return RefDream(cfg, sd), special_token_ids(tiny_dream), cfg


@pytest.fixture(scope="module")
def llada(tiny_llada):
    cfg, sd = load_tiny_state_dict(tiny_llada)
    return RefLLaDA(cfg, sd), special_token_ids(tiny_llada)


def prompt(n, seed=0, hi=256):
    return torch.randint(0, hi, (1, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- FreeCache, Dream

@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_cache_off_equals_dream_sampler(dream, alg):
    model, ids, _ = dream
    for P, gen, steps in ((5, 8, 8), (7, 12, 6)):
        p = prompt(P, seed=P)
        got, nfe, log = freecache_dream_generate(model, p, gen, ids["mask"], steps=steps, block_size=gen, alg=alg,
                                                 use_cache=False)
        want = dream_diffusion_generate(model, p, max_new_tokens=gen, steps=steps, alg=alg, mask_token_id=ids["mask"])
        assert torch.equal(got, want) and nfe == steps
        assert all(e["fed"] == (0, P + gen) and e["cache_read"] == (0, 0) for e in log)


def test_dream_hand_schedule(dream):
    """P 5, gen 8, block 4, steps 8 (note §6.1)."""
    model, ids, _ = dream
    x, nfe, log = freecache_dream_generate(model, prompt(5), 8, ids["mask"], steps=8, block_size=4)
    assert nfe == 8 and (x != ids["mask"]).all()
    assert [e["fed"] for e in log] == [(0, 13)] + [(4, 13)] * 3 + [(8, 13)] * 4
    assert [e["cache_read"] for e in log] == [(0, 0)] + [(0, 4)] * 3 + [(0, 8)] * 4
    assert [e["clean_after"] for e in log] == [4, 4, 4, 8, 8, 8, 8, 12]
    assert [e["kv_source"] for e in log] == [[]] + [[(0, 4, 0)]] * 3 + [[(0, 4, 0), (4, 8, 3)]] * 4
    assert [len(e["committed"]) for e in log] == [0, 1, 1, 2, 0, 1, 1, 2]
    assert all(5 <= p < 9 for e in log[:4] for p in e["committed"])
    assert all(9 <= p < 13 for e in log[4:] for p in e["committed"])
    # Step 0 commits nothing, so step 1's cached forward sees exact K/V: same commit as the uncached run.
    _, _, log_off = freecache_dream_generate(model, prompt(5), 8, ids["mask"], steps=8, block_size=4, use_cache=False)
    assert log_off[1]["committed"] == log[1]["committed"]


def test_dream_steps_per_block_one(dream):
    """spb == 1: each block's only step is its last, so it freezes through block_end - 1 (the authors'
    first step would freeze only [0, P-1), a bug; note §4.1)."""
    model, ids, _ = dream
    x, nfe, log = freecache_dream_generate(model, prompt(5), 8, ids["mask"], steps=2, block_size=4)
    assert nfe == 2 and (x != ids["mask"]).all()
    assert [(e["fed"], e["clean_after"]) for e in log] == [((0, 13), 8), ((8, 13), 12)]


def test_dream_rows_independent(dream):
    model, ids, _ = dream
    p = torch.cat([prompt(5, seed=1), prompt(5, seed=2)])
    x, nfes, _ = freecache_dream_generate(model, p, 8, ids["mask"], steps=8, block_size=4)
    for r in range(2):
        assert torch.equal(x[r:r + 1], freecache_dream_generate(model, p[r:r + 1], 8, ids["mask"], steps=8,
                                                                block_size=4)[0])
    assert nfes == [8, 8]


def test_dream_origin_not_supported(dream):
    model, ids, _ = dream
    with pytest.raises(NotImplementedError):
        freecache_dream_generate(model, prompt(5), 8, ids["mask"], steps=8, block_size=4, alg="origin")


# --------------------------------------------------------------------------- FreeCache, LLaDA

def test_llada_cache_off_equals_llada_generate(llada):
    model, ids = llada
    for P, gen, block, steps in ((5, 8, 4, 8), (6, 16, 8, 8), (4, 12, 12, 6)):
        p = prompt(P, seed=P, hi=250)
        got, nfe, _ = freecache_llada_generate(model, p, steps=steps, gen_length=gen, block_length=block,
                                               mask_id=ids["mask"], use_cache=False)
        want = llada_generate(model, p, steps=steps, gen_length=gen, block_length=block, mask_id=ids["mask"])
        assert torch.equal(got, want) and nfe == steps


def test_llada_hand_schedule(llada):
    """P 5, gen 8, block 4, steps 8 (note §6.2)."""
    model, ids = llada
    x, nfe, log = freecache_llada_generate(model, prompt(5, hi=250), steps=8, gen_length=8, block_length=4,
                                           mask_id=ids["mask"])
    assert nfe == 8 and (x != ids["mask"]).all()
    assert [e["fed"] for e in log] == [(0, 13)] + [(5, 13)] * 3 + [(9, 13)] * 4
    assert [e["clean_after"] for e in log] == [5, 5, 5, 9, 9, 9, 9, 13]
    assert [e["kv_source"] for e in log] == [[]] + [[(0, 5, 0)]] * 3 + [[(0, 5, 0), (5, 9, 3)]] * 4
    assert [len(e["committed"]) for e in log] == [1] * 8


# --------------------------------------------------------------------------- Guided Diffusion

class Guide:
    """AR stand-in: the logits of row r put their argmax on f(next input token, r). Agreeing (next token)
    only works because the oracle feeds prefix + ALL drafts; rows are causal in what they are used for."""

    def __init__(self, vocab, agree_below=10 ** 9):
        self.vocab, self.agree_below = vocab, agree_below
        self.calls = 0

    def __call__(self, ids):
        self.calls += 1
        n = ids.shape[1]
        nxt = torch.cat([ids[0, 1:], ids[0, -1:]])
        rows = torch.arange(n)
        target = torch.where(rows + 1 < self.agree_below, nxt, (nxt + 1) % self.vocab)
        logits = torch.zeros(1, n, self.vocab)
        logits[0, rows, target] = 1.0
        return logits


def greedy_left_to_right(model, p, gen, mask_id, vocab, ar_token):
    """Direct loop: each step one full forward, the first MASK gets the (shifted) argmax, or (argmax + 1) % V."""
    x = torch.cat([p, torch.full((1, gen), mask_id)], dim=1)
    for pos in range(p.shape[1], x.shape[1]):
        d = int(shift_logits(model(x)[0])[0, pos].argmax())
        x[0, pos] = (d + 1) % vocab if ar_token else d
    return x


@pytest.mark.parametrize("mode", ["assisted", "speculative"])
def test_guided_agree_commits_everything_in_one_step(dream, mode):
    model, ids, cfg = dream
    p = prompt(5)
    x, nfe, log = guided_generate(model, Guide(cfg["vocab_size"]), p, 8, ids["mask"], None, mode=mode,
                                  verify_batch_size=3)
    drafts = shift_logits(model(torch.cat([p, torch.full((1, 8), ids["mask"])], 1))[0])[0, 5:].argmax(-1)
    assert nfe == {"dream": 1, "ar": 1 + 3} and len(log) == 1
    assert torch.equal(x[0, 5:], drafts)
    e = log[0]
    assert e["accepted"] == 8 and e["committed"] == list(range(5, 13))
    assert e["ar_prefill"] == (0, 4) and e["ar_chunks"] == [(4, 7), (7, 10), (10, 13)]


@pytest.mark.parametrize("mode", ["assisted", "speculative"])
def test_guided_disagree_one_token_per_step(dream, mode):
    model, ids, cfg = dream
    V, p = cfg["vocab_size"], prompt(5)
    guide = Guide(V, agree_below=0)
    x, nfe, log = guided_generate(model, guide, p, 8, ids["mask"], None, mode=mode, use_cache=False)
    want = greedy_left_to_right(model, p, 8, ids["mask"], V, ar_token=mode == "speculative")
    assert torch.equal(x, want)
    assert nfe == {"dream": 8, "ar": 9} and guide.calls == 8
    assert [e["committed"] for e in log] == [[5 + k] for k in range(8)]
    assert all(e["accepted"] == 0 for e in log)


def test_guided_hand_schedule(dream):
    """Disagreeing guide, assisted, P 5, gen 8, verify_batch_size 32, prompt cache (note §6.3)."""
    model, ids, cfg = dream
    x, nfe, log = guided_generate(model, Guide(cfg["vocab_size"], agree_below=0), prompt(5), 8, ids["mask"], None)
    assert nfe == {"dream": 8, "ar": 9} and (x != ids["mask"]).all()
    assert [e["dream_fed"] for e in log] == [(0, 13)] + [(5, 13)] * 7
    assert [e["cache_read"] for e in log] == [(0, 0)] + [(0, 5)] * 7
    assert [e["drafted"] for e in log] == [(5 + k, 13) for k in range(8)]
    assert [e["ar_prefill"] for e in log] == [(0, 4)] + [None] * 7
    assert [e["ar_chunks"] for e in log] == [[(4 + k, 13)] for k in range(8)]
    assert [e["committed"] for e in log] == [[5 + k] for k in range(8)]


def test_guided_partial_agreement(dream):
    """The guide agrees on the first 2 drafts of step 0, then never: 'assisted' commits 2 drafts,
    'speculative' commits 2 drafts + the AR's token."""
    model, ids, cfg = dream
    V, p = cfg["vocab_size"], prompt(5)
    drafts = shift_logits(model(torch.cat([p, torch.full((1, 8), ids["mask"])], 1))[0])[0, 5:].argmax(-1)
    xa, _, la = guided_generate(model, Guide(V, agree_below=7), p, 8, ids["mask"], None, mode="assisted")
    xs, _, ls = guided_generate(model, Guide(V, agree_below=7), p, 8, ids["mask"], None, mode="speculative")
    assert la[0]["accepted"] == ls[0]["accepted"] == 2
    assert la[0]["committed"] == [5, 6] and ls[0]["committed"] == [5, 6, 7]
    assert torch.equal(xa[0, 5:7], drafts[:2]) and torch.equal(xs[0, 5:7], drafts[:2])
    assert int(xs[0, 7]) == (int(drafts[2]) + 1) % V
    assert all(len(e["committed"]) == 1 for e in la[1:] + ls[1:])


def test_guided_eos_stop(dream):
    """'assisted': a committed draft equal to eos_token_id stops and fills every MASK with it."""
    model, ids, cfg = dream
    p = prompt(5)
    drafts = shift_logits(model(torch.cat([p, torch.full((1, 8), ids["mask"])], 1))[0])[0, 5:].argmax(-1)
    eos = int(drafts[2])
    first = int((drafts == eos).nonzero()[0])
    x, nfe, log = guided_generate(model, Guide(cfg["vocab_size"]), p, 8, ids["mask"], eos)
    assert nfe["dream"] == 1 and log[0]["stopped"] and log[0]["committed"] == list(range(5, 6 + first))
    assert (x[0, 5 + first:] == eos).all()


def test_guided_with_hf_model_and_windows(dream):
    """A real (tiny, random) Qwen2ForCausalLM with the Dream vocab as guide; a window covering the canvas
    equals the uncached run; a small window feeds [last - W, last + W)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    model, ids, cfg = dream
    torch.manual_seed(0)
    ar = Qwen2ForCausalLM(Qwen2Config(vocab_size=cfg["vocab_size"], hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    p = prompt(6)
    for mode in ("assisted", "speculative"):
        x, nfe, log = guided_generate(model, ar, p, 10, ids["mask"], None, mode=mode)
        assert (x != ids["mask"]).all() and nfe["dream"] == len(log)
        assert nfe["ar"] == 1 + sum(len(e["ar_chunks"]) for e in log)
        pos = [q for e in log for q in e["committed"]]
        assert pos == list(range(6, 16)) and all(len(e["committed"]) >= 1 for e in log)
        off = guided_generate(model, ar, p, 10, ids["mask"], None, mode=mode, use_cache=False)[0]
        assert torch.equal(guided_generate(model, ar, p, 10, ids["mask"], None, mode=mode, sliding_window_size=64)[0],
                           off)
    _, _, log = guided_generate(model, Guide(cfg["vocab_size"], agree_below=0), p, 10, ids["mask"], None,
                                sliding_window_size=3)
    assert [e["dream_fed"] for e in log] == [(0, 16)] + [(max(0, 5 + k - 3), min(16, 5 + k + 3)) for k in range(1, 10)]
    assert [e["drafted"] for e in log[1:]] == [(6 + k, min(16, 5 + k + 3)) for k in range(1, 10)]


def test_guided_llada_no_shift(llada):
    """Derived LLaDA analogue: drafts are read at the MASK's own row (no shift)."""
    model, ids = llada
    p = prompt(5, hi=250)
    x, nfe, _ = guided_generate(model, Guide(model.head.shape[0]), p, 8, ids["mask"], None)
    assert nfe["dream"] == 1 and torch.equal(
        x[0, 5:], model(torch.cat([p, torch.full((1, 8), ids["mask"])], 1))[0][0, 5:].argmax(-1))

"""Self-checks of the Elastic-Cache oracle (tests/reference_elastic.py) on tiny random checkpoints.

- A forced full recompute every step (drift "before layer 0") equals the uncached forward with the same
  decoding rule, for LLaDA and Dream, with and without block caching, with EOS truncation; with the window
  covering the whole generation it equals Fast-dLLM's uncached threshold decoding (one block).
- A 1-layer model is exact under the authors' own rule (layer-0 K/V depend only on the token).
- gamma > 1 (drift at layer 0 every step) is NOT exact for L >= 2: layer 1 reads stale cached inputs.
- The logged schedule equals the hand-computed one (docs/notes/elastic.md §6).
"""
from __future__ import annotations

import pytest
import torch
from checkpoints import (
    load_tiny_state_dict,
    qwen_special_token_ids,
    special_token_ids,
    write_tiny_dream,
    write_tiny_llada,
)
from reference_dream import RefDream
from reference_elastic import (
    elastic_generate_dream,
    elastic_generate_llada,
    window_uncached_generate_dream,
    window_uncached_generate_llada,
)
from reference_llada import RefLLaDA, fastdllm_generate

NO_EOS = -1          # an id no argmax can produce: EOS truncation off


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    out = {}
    for n_layers in (1, 2, 4):
        path = write_tiny_llada(tmp_path_factory.mktemp("el") / f"llada{n_layers}", seed=0, n_layers=n_layers)
        out[n_layers] = RefLLaDA(*load_tiny_state_dict(path))
    out["ids"] = special_token_ids(path)
    return out


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    out = {}
    for n_layers in (1, 2):
        path = write_tiny_dream(tmp_path_factory.mktemp("el") / f"dream{n_layers}", seed=0,
                                num_hidden_layers=n_layers)
        out[n_layers] = RefDream(*load_tiny_state_dict(path))
    out["ids"] = qwen_special_token_ids(path)
    return out


def _prompt(P, seed=0, B=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (B, P), generator=g)


def _eos_from(x, P, k):
    """A token the uncached run actually produces, at generation offset k: used as EOS to exercise truncation."""
    return int(x[0, P + k])


ALWAYS_FULL = lambda step: -1


# --------------------------------------------------------------------------- exactness checks

@pytest.mark.parametrize("window,block_caching,threshold", [(4, True, 0.9), (3, False, 0.9), (16, True, 0.5),
                                                             (2, True, None)])
def test_llada_forced_full_recompute_equals_uncached(llada, window, block_caching, threshold):
    m, mask = llada[2], llada["ids"]["mask"]
    prompt = _prompt(5)
    kw = {"mask_id": mask, "gen_length": 12, "window_length": window, "threshold": threshold, "block_caching": block_caching}
    ref, ref_nfe, _ = window_uncached_generate_llada(m, prompt, eos_id=NO_EOS, **kw)
    for eos in (NO_EOS, _eos_from(ref, 5, 6)):
        ref, ref_nfe, ref_log = window_uncached_generate_llada(m, prompt, eos_id=eos, **kw)
        x, nfe, log = elastic_generate_llada(m, prompt, eos_id=eos, force_drift=ALWAYS_FULL, **kw)
        assert torch.equal(x, ref) and nfe == ref_nfe
        assert [s["decoded"] for s in log["steps"]] == [s["decoded"] for s in ref_log["steps"]]
        assert all(s["full_layers"] == [0, 1] for s in log["steps"])
    # after the first decoded EOS nothing to its right is decoded any more (what is still MASK stays MASK)
    k = next((j for j, st in enumerate(log["steps"]) if st["eos_truncated_at"] is not None), None)
    if k is not None:
        e = log["steps"][k]["eos_truncated_at"]
        assert all(p < e for st in log["steps"][k + 1:] for p in st["decoded"])
        decoded = {p for st in log["steps"] for p in st["decoded"]}
        assert all((x[0, p] == mask) == (p not in decoded) for p in range(5, 17))


@pytest.mark.parametrize("window,block_caching", [(4, True), (3, False)])
def test_dream_forced_full_recompute_equals_uncached(dream, window, block_caching):
    m, mask = dream[2], dream["ids"]["mask"]
    prompt = _prompt(6, seed=1)
    kw = {"mask_id": mask, "max_new_tokens": 12, "window_length": window, "threshold": 0.9, "block_caching": block_caching}
    ref, _, _ = window_uncached_generate_dream(m, prompt, eos_id=NO_EOS, **kw)
    for eos in (NO_EOS, _eos_from(ref, 6, 5)):
        ref, ref_nfe, _ = window_uncached_generate_dream(m, prompt, eos_id=eos, **kw)
        x, nfe, _log = elastic_generate_dream(m, prompt, eos_id=eos, force_drift=ALWAYS_FULL, **kw)
        assert torch.equal(x, ref) and nfe == ref_nfe


def test_window_covering_all_equals_fastdllm_threshold(llada):
    """Full recompute + window >= gen + no EOS == Fast-dLLM `generate` with threshold and one block."""
    m, mask = llada[2], llada["ids"]["mask"]
    prompt = _prompt(5, seed=2)
    for th in (0.9, 0.3):
        fd, fd_nfe = fastdllm_generate(m, prompt, steps=12, gen_length=12, block_length=12, mask_id=mask,
                                       threshold=th)
        x, nfe, _ = elastic_generate_llada(m, prompt, mask_id=mask, gen_length=12, window_length=16, threshold=th,
                                           eos_id=NO_EOS, force_drift=ALWAYS_FULL)
        assert torch.equal(x, fd) and nfe == fd_nfe
    # threshold 0 decodes the whole window per step: the window is then exactly Fast-dLLM's block
    fd, fd_nfe = fastdllm_generate(m, prompt, steps=12, gen_length=12, block_length=4, mask_id=mask, threshold=0.0)
    x, nfe, _ = elastic_generate_llada(m, prompt, mask_id=mask, gen_length=12, window_length=4, threshold=0.0,
                                       eos_id=NO_EOS, force_drift=ALWAYS_FULL)
    assert torch.equal(x, fd) and nfe == fd_nfe == 3


@pytest.mark.parametrize("gamma", [0.9, 2.0, 0.0])
def test_one_layer_model_is_exact(llada, dream, gamma):
    kw = {"window_length": 3, "threshold": 0.9, "eos_id": NO_EOS}
    prompt = _prompt(5, seed=3)
    ref, ref_nfe, _ = window_uncached_generate_llada(llada[1], prompt, mask_id=llada["ids"]["mask"], gen_length=10, **kw)
    x, nfe, _ = elastic_generate_llada(llada[1], prompt, mask_id=llada["ids"]["mask"], gen_length=10, gamma=gamma, **kw)
    assert torch.equal(x, ref) and nfe == ref_nfe
    ref, ref_nfe, _ = window_uncached_generate_dream(dream[1], prompt, mask_id=dream["ids"]["mask"], max_new_tokens=10, **kw)
    x, nfe, _ = elastic_generate_dream(dream[1], prompt, mask_id=dream["ids"]["mask"], max_new_tokens=10, gamma=gamma, **kw)
    assert torch.equal(x, ref) and nfe == ref_nfe


def test_step0_is_a_full_forward_and_gamma_above_1_is_not_exact(llada):
    m, mask = llada[2], llada["ids"]["mask"]
    prompt = _prompt(5, seed=4)
    kw = {"mask_id": mask, "gen_length": 8, "window_length": 4, "threshold": 0.0, "eos_id": NO_EOS, "record_logits": True}
    _ref_x, _, ref_log = window_uncached_generate_llada(m, prompt, **kw)
    _x, _nfe, log = elastic_generate_llada(m, prompt, gamma=2.0, **kw)
    assert torch.allclose(log["steps"][0]["logits"], ref_log["steps"][0]["logits"], atol=1e-5)
    # threshold 0: the decoded POSITIONS do not depend on the logits...
    assert [st["decoded"] for st in log["steps"]] == [st["decoded"] for st in ref_log["steps"]]
    # ...but step 1's logits do: layer 1 recomputes all positions from STALE cached layer-1 inputs.
    diff = (log["steps"][1]["logits"] - ref_log["steps"][1]["logits"]).abs().max()
    assert diff > 1e-4
    assert log["steps"][1]["drift_layer"] == 0 and log["steps"][1]["full_layers"] == [1]


# --------------------------------------------------------------------------- schedules

def _check_feed(step, expect_new, expect_window, allowed_track):
    fed, track = step["fed"], step["track"]
    assert fed == track + expect_new + expect_window
    assert set(track) <= set(allowed_track) and len(set(fed)) == len(fed)


def test_hand_schedule_forced_drift_llada(llada):
    """docs/notes/elastic.md §6: P=5, gen=8 (N=13), window 2, threshold 0, L=4, gamma=-1 (never drifts by
    itself), forced drift at layer 0 (step 1), layer 2 (step 2), layer 3 = last (step 3)."""
    m, mask = llada[4], llada["ids"]["mask"]
    x, nfe, log = elastic_generate_llada(m, _prompt(5, seed=5), mask_id=mask, gen_length=8, window_length=2,
                                         threshold=0.0, gamma=-1.0, eos_id=NO_EOS, force_drift={1: 0, 2: 2, 3: 3})
    s = log["steps"]
    assert nfe == 4 and (x != mask).all()
    assert s[0]["fed"] == list(range(13)) and s[0]["full_layers"] == [0, 1, 2, 3] and s[0]["drift_layer"] is None
    assert [st["decoded"] for st in s] == [[5, 6], [7, 8], [9, 10], [11, 12]]
    _check_feed(s[1], [5, 6], [7, 8], range(5))
    _check_feed(s[2], [7, 8], [9, 10], range(7))
    _check_feed(s[3], [9, 10], [11, 12], range(9))
    assert [st["drift_layer"] for st in s] == [None, 0, 2, 3]
    assert [st["full_layers"] for st in s] == [[0, 1, 2, 3], [1, 2, 3], [3], []]
    assert [st["layers_recomputed"] for st in s] == [5, 3, 1, 0]
    assert log["fraction"] == 9 / 16
    # the drift similarity is evaluated exactly on the cached layers up to and including the drift layer
    assert [[e["sim"] is not None for e in st["layers"]] for st in s[1:]] == [
        [True, False, False, False], [True, True, True, False], [True, True, True, True]]
    assert all(0.0 <= e["sim"] <= 1.0 + 1e-6 for st in s[1:] for e in st["layers"] if e["sim"] is not None)


def test_gamma_schedules(llada):
    m, mask = llada[4], llada["ids"]["mask"]
    kw = {"mask_id": mask, "gen_length": 8, "window_length": 2, "threshold": 0.0, "eos_id": NO_EOS}
    _, nfe, log = elastic_generate_llada(m, _prompt(5, seed=6), gamma=2.0, **kw)     # always drifts at layer 0
    assert nfe == 4 and all(st["full_layers"] == [1, 2, 3] for st in log["steps"][1:])
    assert log["fraction"] == (5 + 3 * 3) / 16
    _, nfe, log = elastic_generate_llada(m, _prompt(5, seed=6), gamma=0.0, **kw)     # never drifts
    assert all(st["full_layers"] == [] for st in log["steps"][1:]) and log["fraction"] == 5 / 16


def test_schedule_without_block_caching_and_dream_shift(llada, dream):
    m, mask = llada[2], llada["ids"]["mask"]
    _, nfe, log = elastic_generate_llada(m, _prompt(5, seed=7), mask_id=mask, gen_length=8, window_length=2,
                                         threshold=0.0, gamma=-1.0, eos_id=NO_EOS, block_caching=False)
    s = log["steps"]
    assert nfe == 4 and [st["decoded"] for st in s] == [[5, 6], [7, 8], [9, 10], [11, 12]]
    _check_feed(s[1], [5, 6], list(range(7, 13)), range(5))        # every remaining MASK is fed
    _check_feed(s[3], [9, 10], [11, 12], range(9))
    # Dream: window queries are one left of the masks; with a new decode right before them they repeat
    m, mask = dream[2], dream["ids"]["mask"]
    _, nfe, log = elastic_generate_dream(m, _prompt(5, seed=7), mask_id=mask, max_new_tokens=8, window_length=2,
                                         threshold=0.0, gamma=-1.0, eos_id=NO_EOS)
    s = log["steps"]
    assert nfe == 4 and [st["decoded"] for st in s] == [[5, 6], [7, 8], [9, 10], [11, 12]]
    assert s[1]["fed"] == s[1]["track"] + [5, 6] + [6, 7]             # position 6 fed twice
    assert s[2]["fed"] == s[2]["track"] + [7, 8] + [8, 9]


def test_batch_rows_run_independently(llada):
    m, mask = llada[2], llada["ids"]["mask"]
    prompts = _prompt(5, seed=8, B=2)
    kw = {"mask_id": mask, "gen_length": 8, "window_length": 4, "eos_id": NO_EOS}
    x, nfe, _logs = elastic_generate_llada(m, prompts, **kw)
    for r in range(2):
        xr, nr, _ = elastic_generate_llada(m, prompts[r:r + 1], **kw)
        assert torch.equal(x[r:r + 1], xr) and nfe[r] == nr


@pytest.mark.parametrize("gamma", [0.97, 0.985, 0.99])
def test_natural_drift_is_the_first_cached_layer_below_gamma(llada, gamma):
    m, mask = llada[4], llada["ids"]["mask"]
    _, _, log = elastic_generate_llada(m, _prompt(6, seed=0), mask_id=mask, gen_length=12, window_length=4,
                                       gamma=gamma, eos_id=NO_EOS)
    L = 4
    for st in log["steps"][1:]:
        sims = [e["sim"] for e in st["layers"]]
        below = [n for n, s in enumerate(sims) if s is not None and s < gamma]
        d = st["drift_layer"]
        assert below == ([] if d is None else [d])
        last_cached = L - 1 if d is None else d
        assert all(s is not None for s in sims[: last_cached + 1]) and all(s is None for s in sims[last_cached + 1:])
        assert st["full_layers"] == list(range(last_cached + 1, L))
        assert st["layers_recomputed"] == L - 1 - last_cached

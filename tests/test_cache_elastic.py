"""Elastic-Cache (`cache="elastic"`, cache/elastic.py) against the independent oracle `reference_elastic.py`
(the authors' code, yxu-dev/Elastic-Cache @ 46c0bc3; docs/notes/elastic.md) on tiny checkpoints, fp32, CPU.

- token-for-token parity at temperature 0 (LLaDA and Dream), same NFE, same per-step schedule (fed columns,
  drift layer, recomputed layers), the authors' fraction and the kv count, with and without drift, with EOS;
- the hand-computed schedule of the note (§6, forced drift through the policy's test hook);
- a padded batch gives every row what it gives alone (one block, and blocks smaller than the generation);
- a forced restart at layer 0 every step equals uncached sliding-window decoding, with the full kv count;
- refused combinations.
Parity holds with block_length = max_tokens (the authors have no blocks).
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
from reference_llada import RefLLaDA

from dllm.cache.elastic import ElasticCache
from dllm import LLM, SamplingParams
from dllm.errors import InvalidParameterError

NO_EOS = -1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    llada = write_tiny_llada(root / "llada4", seed=0, n_layers=4)
    dream = write_tiny_dream(root / "dream3", seed=0, num_hidden_layers=3)   # GQA: 4 query heads, 2 KV heads
    return {
        "llada": (llada, RefLLaDA(*load_tiny_state_dict(llada)), special_token_ids(llada)["mask"], 4),
        "dream": (dream, RefDream(*load_tiny_state_dict(dream)), qwen_special_token_ids(dream)["mask"], 3),
    }


_LLMS: dict = {}


def _llm(path, **opts) -> LLM:
    key = (str(path), tuple(sorted(opts.items())))
    if key not in _LLMS:
        _LLMS[key] = LLM(str(path), cache="elastic", strategy="threshold", cache_options=opts, dtype="float32",
                         device="cpu")
    return _LLMS[key]


def _prompt(n, seed):
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _oracle(family, ref, prompt, mask, gen, **kw):
    if family == "llada":
        return elastic_generate_llada(ref, torch.tensor([prompt]), mask_id=mask, gen_length=gen, **kw)
    return elastic_generate_dream(ref, torch.tensor([prompt]), mask_id=mask, max_new_tokens=gen, **kw)


def _runtime(path, prompts, gen, threshold, opts, stop=None, block=None, trace=False):
    params = SamplingParams(max_tokens=gen, block_length=block or gen, threshold=threshold, temperature=0,
                            ignore_eos=True, stop_token_ids=[] if stop is None else [stop])
    ElasticCache.trace = [] if trace else None
    try:
        outs = _llm(path, **opts).generate(prompts, params)
        return outs, ElasticCache.trace
    finally:
        ElasticCache.trace = None


def _finish(log, x, P, eos):
    """What the runtime returns for the oracle's run: it ends the row after the first step at which a stop token
    is committed with nothing masked before the leftmost one (tokens up to and including it)."""
    decoded: set[int] = set()
    for k, st in enumerate(log["steps"]):
        decoded |= set(st["decoded"])
        stops = sorted(p for p in decoded if int(x[p]) == eos)
        if stops and all(p in decoded for p in range(P, stops[0])):
            return x[P:stops[0] + 1].tolist(), k + 1
    return x[P:].tolist(), len(log["steps"])


def _kv(log, N, L):
    """kv computations per step from the oracle's log: fed slots in cached layers, N in recomputed ones."""
    out = []
    for st in log["steps"]:
        if st["step"] == 0:
            out.append(N * L)
        else:
            full = len(st["full_layers"])
            out.append(len(st["fed"]) * (L - full) + N * full)
    return out


def _compare_schedule(trace, log, N, L):
    assert [t["step"] for t in trace] == [st["step"] for st in log["steps"]]
    for t, st in zip(trace[1:], log["steps"][1:]):
        assert t["fed"] == st["fed"]
        assert t["drift_layer"] == st["drift_layer"]
        assert t["full_layers"] == st["full_layers"]
    assert [t["layers_recomputed"] for t in trace] == [st["layers_recomputed"] for st in log["steps"]]
    assert [t["kv"] for t in trace] == _kv(log, N, L)
    assert sum(t["layers_recomputed"] for t in trace) / (L * len(trace)) == log["fraction"]


# --------------------------------------------------------------------------- 1. parity with the oracle

# (family, prompt length, gen, window, gamma, track_num, block_caching, threshold, drifts): gamma 0 never
# drifts, 2 drifts at layer 0 every step, 0.97-0.99 drift naturally at varying layers on these weights.
PARITY = [
    ("llada", 6, 16, 4, 0.9, 1, True, 0.5, "some"),
    ("llada", 9, 12, 3, 0.97, 1, False, 0.7, "some"),
    ("llada", 5, 16, 16, 0.99, 2, True, 0.9, "some"),
    ("llada", 7, 20, 5, 2.0, 3, True, 0.3, "all"),
    ("llada", 8, 16, 6, 0.0, 1, False, 0.5, "none"),
    ("dream", 6, 16, 4, 0.97, 1, True, 0.3, "some"),
    ("dream", 9, 12, 3, 0.99, 2, False, 0.5, "some"),
    ("dream", 5, 16, 16, 2.0, 1, True, 0.9, "all"),
    ("dream", 7, 12, 5, 0.0, 1, True, 0.4, "none"),
]


@pytest.mark.parametrize("family,P,gen,window,gamma,track_num,block_caching,threshold,drifts", PARITY)
def test_parity_with_the_authors_algorithm(models, family, P, gen, window, gamma, track_num, block_caching,
                                           threshold, drifts):
    path, ref, mask, L = models[family]
    prompt = _prompt(P, seed=P + gen + window)
    opts = {"window_length": window, "gamma": gamma, "track_num": track_num, "block_caching": block_caching}
    x, nfe, log = _oracle(family, ref, prompt, mask, gen, eos_id=NO_EOS, threshold=threshold, **opts)
    layers = [st["drift_layer"] for st in log["steps"][1:]]
    assert {"none": all(d is None for d in layers), "all": all(d == 0 for d in layers),
            "some": any(d is not None for d in layers) and any(d is None or d > 0 for d in layers)}[drifts]
    (out,), trace = _runtime(path, [prompt], gen, threshold, opts, trace=True)
    assert out.token_ids == x[0, P:].tolist()
    assert out.metrics.nfe == nfe
    _compare_schedule(trace, log, P + gen, L)
    assert out.metrics.kv_computations == sum(_kv(log, P + gen, L))
    assert out.metrics.kv_computations_per_step == _kv(log, P + gen, L)
    assert out.metrics.kv_fraction == pytest.approx(sum(_kv(log, P + gen, L)) / (nfe * (P + gen) * L))
    assert out.metrics.cache_stats["layers_recomputed_fraction"] == pytest.approx(log["fraction"])


@pytest.mark.parametrize("family,offset,window", [("llada", 5, 4), ("dream", 4, 6), ("llada", 9, 16)])
def test_parity_with_eos_truncation(models, family, offset, window):
    """The first committed stop token abandons every mask after it (they leave the window): same tokens up to
    the first stop, and the NFE at which the runtime sees nothing masked before it."""
    path, ref, mask, _ = models[family]
    P, gen = 7, 20
    prompt = _prompt(P, seed=offset)
    opts = {"window_length": window, "gamma": 0.98}
    x, _, _ = _oracle(family, ref, prompt, mask, gen, eos_id=NO_EOS, threshold=0.4, **opts)
    eos = int(x[0, P + offset])
    x, _, log = _oracle(family, ref, prompt, mask, gen, eos_id=eos, threshold=0.4, **opts)
    assert any(st["eos_truncated_at"] is not None for st in log["steps"])
    want, want_nfe = _finish(log, x[0], P, eos)
    (out,), _ = _runtime(path, [prompt], gen, 0.4, opts, stop=eos)
    assert out.token_ids == want and out.finish_reason == "stop"
    assert out.metrics.nfe == want_nfe


# --------------------------------------------------------------------------- 2. the note's hand schedule

def test_hand_computed_schedule_with_forced_drift(models, monkeypatch):
    """docs/notes/elastic.md §6, setting A: P=5, gen=8 (N=13), L=4, window 2, every window position decoded
    (threshold ~0), gamma=-1 (never drifts by itself), drift forced at layer 0 (step 1), 2 (step 2), 3 = last
    (step 3)."""
    path, ref, mask, L = models["llada"]
    prompt = _prompt(5, seed=5)
    force = {1: 0, 2: 2, 3: 3}
    monkeypatch.setattr(ElasticCache, "force_drift", force)
    (out,), s = _runtime(path, [prompt], 8, 1e-6, {"window_length": 2, "gamma": -1.0}, trace=True)
    assert out.metrics.nfe == 4 and len(out.token_ids) == 8
    assert [t["window"] for t in s] == [[5, 6], [7, 8], [9, 10], [11, 12]]        # window = decoded
    assert s[0]["fed"] == list(range(13)) and s[0]["drift_layer"] is None
    for t, new, window, seen in ((s[1], [5, 6], [7, 8], 5), (s[2], [7, 8], [9, 10], 7), (s[3], [9, 10], [11, 12], 9)):
        track = t["track"]
        assert t["fed"] == track + new + window and t["new"] == new and t["queries"] == window
        assert set(track) <= set(range(seen)) and 1 <= len(track) <= L
    assert [t["drift_layer"] for t in s] == [None, 0, 2, 3]
    assert [t["full_layers"] for t in s] == [[0, 1, 2, 3], [1, 2, 3], [3], []]
    assert [t["layers_recomputed"] for t in s] == [5, 3, 1, 0]
    assert sum(t["layers_recomputed"] for t in s) / (L * 4) == 9 / 16                  # the authors' fraction
    # kv: all 13 x 4 at step 0; then fed x cached layers + 13 x recomputed layers
    fed = [len(t["fed"]) for t in s]
    assert [t["kv"] for t in s] == [52, fed[1] * 1 + 13 * 3, fed[2] * 3 + 13 * 1, fed[3] * 4]
    assert out.metrics.kv_computations == sum(t["kv"] for t in s)
    # the drift similarity is computed exactly on the cached layers (up to and including the drift layer)
    assert [[x is not None for x in t["sims"]] for t in s[1:]] == [
        [True, False, False, False], [True, True, True, False], [True, True, True, True]]
    # and the oracle, with the same forcing, agrees on every step (tracks included) and on the tokens
    x, _, log = elastic_generate_llada(ref, torch.tensor([prompt]), mask_id=mask, gen_length=8, window_length=2,
                                       threshold=0.0, gamma=-1.0, eos_id=NO_EOS, force_drift=force)
    assert out.token_ids == x[0, 5:].tolist()
    _compare_schedule(s, log, 13, L)
    for t, st in zip(s[1:], log["steps"][1:]):
        sims = [e["sim"] for e in st["layers"]]
        assert [a is None for a in t["sims"]] == [b is None for b in sims]
        assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(t["sims"], sims) if a is not None)


# --------------------------------------------------------------------------- 3. batch independence

@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("block", [24, 8])
def test_padded_batch_rows_are_independent(models, family, block):
    """Rows drift at different layers and steps; each gets what it gets alone (tokens and kv). With one block
    the NFE is the same too; with smaller blocks a row that finished its block idles (feeds nothing, keeps its
    state) while others finish theirs, and the engine still counts those forwards in its NFE."""
    path = models[family][0]
    rows = [_prompt(n, seed=n) for n in (5, 11, 8)]
    opts = {"window_length": 4, "gamma": 0.98, "track_num": 2}
    outs, trace = _runtime(path, rows, 24, 0.5, opts, block=block, trace=True)
    drifts = {(t["row"], t["drift_layer"]) for t in trace if t["step"] > 0}
    assert len({r for r, d in drifts if d is not None}) == 3 and len({d for _, d in drifts}) >= 3
    for row, out in zip(rows, outs):
        (alone,), _ = _runtime(path, [row], 24, 0.5, opts, block=block)
        assert out.token_ids == alone.token_ids
        assert out.metrics.kv_computations == alone.metrics.kv_computations
        if block == 24:
            assert out.metrics.nfe == alone.metrics.nfe


# --------------------------------------------------------------------------- 4. forced restart == uncached

@pytest.mark.parametrize("family,window,block_caching,threshold", [("llada", 4, True, 0.5), ("llada", 3, False, 0.9),
                                                                   ("dream", 4, True, 0.4), ("dream", 16, False, 0.6)])
def test_forced_restart_every_step_equals_uncached_window_decoding(models, monkeypatch, family, window,
                                                                   block_caching, threshold):
    path, ref, mask, L = models[family]
    P, gen = 6, 16
    prompt = _prompt(P, seed=window)
    monkeypatch.setattr(ElasticCache, "force_drift", lambda step: -1)
    (out,), trace = _runtime(path, [prompt], gen, threshold, {"window_length": window, "block_caching": block_caching},
                             trace=True)
    uncached = window_uncached_generate_llada if family == "llada" else window_uncached_generate_dream
    kw = {"gen_length": gen} if family == "llada" else {"max_new_tokens": gen}
    x, nfe, _ = uncached(ref, torch.tensor([prompt]), mask_id=mask, window_length=window, eos_id=NO_EOS,
                         threshold=threshold, block_caching=block_caching, **kw)
    assert out.token_ids == x[0, P:].tolist() and out.metrics.nfe == nfe
    assert all(t["full_layers"] == list(range(L)) for t in trace)
    assert out.metrics.kv_computations == nfe * (P + gen) * L and out.metrics.kv_fraction == 1.0


# --------------------------------------------------------------------------- 5. refused combinations

def test_refused_combinations(models, tiny_sdar):
    path = models["llada"][0]
    with pytest.raises(InvalidParameterError, match="cache 'elastic' needs full attention") as e:
        LLM(str(tiny_sdar), cache="elastic", strategy="reference")
    messages = [str(e.value)]
    with pytest.raises(InvalidParameterError, match="does not support cfg_scale") as e:
        _llm(path).generate([_prompt(5, 0)], SamplingParams(max_tokens=8, block_length=8, cfg_scale=1.0))
    messages.append(str(e.value))
    for options, match in [({"window": 4}, "has no option 'window'; its options: window_length, gamma"),
                           ({"window_length": 0}, "window_length must be >= 1"),
                           ({"window_length": 2.5}, "window_length=2.5 must be a int"),
                           ({"track_num": 0}, "track_num must be >= 1"),
                           ({"gamma": "high"}, "gamma='high' must be a float"),
                           ({"gamma": float("nan")}, "gamma must be a finite number"),
                           ({"block_caching": "maybe"}, "block_caching='maybe' must be a bool")]:
        with pytest.raises(InvalidParameterError, match=match) as e:
            LLM(str(path), cache="elastic", cache_options=options, device="cpu", strategy="reference")
        messages.append(str(e.value))
    assert all("\n" not in m for m in messages)
    # CLI-style strings are read as the option's type
    assert ElasticCache.resolve_options({"window_length": "8", "gamma": "0.95", "block_caching": "false"}) == {
        "window_length": 8, "gamma": 0.95, "track_num": 1, "block_caching": False}

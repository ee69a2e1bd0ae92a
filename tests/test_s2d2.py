"""S2D2 (`strategy="s2d2"`): token-exact parity with the authors' SDAR sampler, batched; the verification mask;
the router's pieces; options, presets and errors; the CLI and the server.

Oracle: tests/data/s2d2_golden.json, tokens recorded from phymhan/S2D2's own `block_diffusion_generate` (SDAR
path) on the bundled tiny-sdar checkpoint (float32), for every routing policy, every acceptance estimator, both
cache modes (cache_ver / draft_ver), the extra-commit flags, every fallback rule, the paper presets, at
temperature 0 and seeded sampling, on four prompts (19 and 13 tokens: not a multiple of the block; 40 and 8: a
multiple); tests/data/s2d2_golden.md says how. Each case decodes the four prompts in one batch: every row must
equal what the authors' batch-1 code produced for it alone.
"""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from dllm import LLM, SamplingParams
from dllm.errors import InvalidParameterError

GOLDEN = json.loads((pathlib.Path(__file__).parent / "data" / "s2d2_golden.json").read_text())
CASES = {c["name"]: c for c in GOLDEN["cases"]}
_LLMS: dict = {}


def s2d2(options: dict, cache: str = "block") -> LLM:
    key = (json.dumps(options, sort_keys=True), cache)
    if key not in _LLMS:
        _LLMS[key] = LLM("tiny-sdar", strategy="s2d2", cache=cache, device="cpu", dtype="float32",
                         strategy_options=options)
    return _LLMS[key]


def params(case: dict) -> SamplingParams:
    return SamplingParams(ignore_eos=True, **case["params"])


@pytest.mark.parametrize("name", list(CASES))
def test_batch_matches_the_authors_sampler_row_by_row(name):
    case = CASES[name]
    outs = s2d2(case["options"]).generate(GOLDEN["prompts"], params(case))
    assert [o.token_ids for o in outs] == case["tokens"]


@pytest.mark.parametrize("name,cache", [("cache_ver=True-draft_ver=True", "none"),
                                        ("cache_ver=False-draft_ver=True-sampled-static", "none"),
                                        ("cache_ver=True-draft_ver=False", "prefix"),
                                        ("config-a-T1.0", "dual")])
def test_other_exact_caches_give_the_same_tokens(name, cache):
    """The causal rows of cache_ver / draft_ver reach every cache through the run's mask (none: also the
    verification forward's uncached prefix)."""
    case = CASES[name]
    outs = s2d2(case["options"], cache).generate(GOLDEN["prompts"], params(case))
    assert [o.token_ids for o in outs] == case["tokens"]


@pytest.mark.parametrize("name", ["default-greedy", "ucb-span", "config-a-T0.0", "fallback-sequential-quota2",
                                  "span3-legacy"])
def test_forwards_and_verifications_alone_match_the_authors_count(name):
    """The authors count prefill and one store forward per block beyond drafts and verifications; the block
    cache folds those into the next draft. Prompt 1 (40 tokens) fills whole blocks to the end of the canvas."""
    case = CASES[name]
    out = s2d2(case["options"]).generate([GOLDEN["prompts"][1]], params(case))[0]
    stats = out.metrics.strategy_stats
    assert stats["verify_calls"] == case["verifies"][1]
    assert out.metrics.nfe == case["drafts"][1] + case["verifies"][1]
    assert stats["router_verify"] + stats["router_skip"] == case["drafts"][1]


def test_golden_cases_exercise_rejections_fallbacks_and_both_router_outcomes():
    """The oracle is only as good as the paths it covers."""
    seen = {"resampled": 0, "skip": 0, "verify": 0}
    for name in ("default-sampled", "ucb-masked-sampled", "config-b-T1.0", "threshold-static-soft_entropy_negexp"):
        case = CASES[name]
        for o in s2d2(case["options"]).generate(GOLDEN["prompts"], params(case)):
            s = o.metrics.strategy_stats
            seen["resampled"] += s["resampled_tokens"]
            seen["skip"] += s["router_skip"]
            seen["verify"] += s["verify_calls"]
    assert all(v > 0 for v in seen.values()), seen


def test_seeded_rows_are_independent_of_their_batch():
    llm = s2d2({"do_verify_policy": "contextual_bandit_ucb"})
    prompts = GOLDEN["prompts"]
    for seed in (None, 7):
        sp = SamplingParams(max_tokens=20, block_length=4, steps=4, temperature=1.0 if seed else 0.0, seed=seed,
                            ignore_eos=True)
        alone = [llm.generate([p], sp)[0].token_ids for p in prompts]
        assert [o.token_ids for o in llm.generate(prompts, sp)] == alone


def test_greedy_without_a_seed_is_deterministic():
    llm = s2d2({})
    sp = SamplingParams(max_tokens=16, block_length=4, temperature=0, ignore_eos=True)
    assert llm.generate(GOLDEN["prompts"][2:], sp)[0].token_ids == llm.generate(GOLDEN["prompts"][2:], sp)[0].token_ids


# --- pieces -----------------------------------------------------------------------------------------------

def test_verify_visibility_is_the_2l_mask():
    from dllm.decoding.s2d2 import verify_visibility
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0],
                         [1, 0, 0, 0, 1, 0],
                         [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(verify_visibility(3), want)


def test_first_span_and_expected_tokens():
    from dllm.decoding.s2d2 import first_span
    from dllm.decoding.s2d2_router import bin_index, expected_accepted
    masked = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    want = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(first_span(masked), want)
    assert expected_accepted(torch.tensor([0.5, 0.5, 1.0])) == pytest.approx(0.5 + 0.25 + 0.25)
    assert expected_accepted(torch.tensor([])) == 0.0
    assert [bin_index(v, 1.0, 4.0, 2) for v in (0, 1, 2.4, 2.5, 4, 9)] == [0, 0, 0, 1, 1, 1]
    assert bin_index(3.0, 1.0, 1.0, 2) == 0 and bin_index(0.7, 0.0, 1.0, 1) == 0


def test_residual_never_returns_the_mask_and_falls_back_to_q():
    llm = s2d2({})
    from dllm.decoding.s2d2 import S2D2Strategy
    strat = S2D2Strategy(SamplingParams(temperature=0.0, block_length=4, steps=4), llm.spec)
    mask = llm.spec.mask_id
    q = torch.zeros(8)
    q[mask], q[5] = 0.9, 0.1
    p = q.clone()                                  # no residual mass: draw from q, whose top token is the mask
    g = torch.Generator().manual_seed(0)
    assert all(strat._residual(q, p, g) == 5 for _ in range(20))
    p = torch.zeros(8)
    p[mask] = 1.0                                  # residual = q without the mask's share: always 5
    assert all(strat._residual(q, p, g) == 5 for _ in range(5))


# --- options, presets, errors -----------------------------------------------------------------------------

def test_preset_fills_the_request_and_explicit_options_win():
    llm = s2d2({"preset": "config-b"})
    assert llm.engine.resolve(SamplingParams()).block_length == 16
    assert llm.engine.resolve(SamplingParams()).steps == 16
    assert llm.engine.resolve(SamplingParams(block_length=8)).steps == 8
    state = s2d2({"preset": "config-a", "score_penalty_coef": 3}).engine.strategy_state
    assert state["score_penalty_coef"] == 3.0 and state["cache_ver"] and state["draft_ver"]
    assert state["token_acceptance_estimator"] == "soft_entropy_negexp"


@pytest.mark.parametrize("options,match", [
    ({"verify_policy": "x"}, "has no option 'verify_policy'"),
    ({"do_verify_policy": "always"}, "do_verify_policy='always' is not one of"),
    ({"token_acceptance_estimator": "margin"}, "is not one of"),
    ({"preset": "config-z"}, "is not a preset"),
    ({"do_verify_policy": "score_hysteresis", "hysteresis_threshold_on": -2}, "hysteresis_threshold_on >"),
    ({"ucb_entropy_bins": 0}, "must be at least 1"),
    ({"cache_ver": "maybe"}, "must be a bool"),
])
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(InvalidParameterError, match=match) as err:
        LLM("tiny-sdar", strategy="s2d2", device="cpu", strategy_options=options)
    assert "\n" not in str(err.value)


def test_refuses_caches_it_does_not_list_and_other_families(monkeypatch):
    from dllm.decoding.s2d2 import S2D2Strategy
    monkeypatch.setattr(S2D2Strategy, "caches", ("none",))
    with pytest.raises(InvalidParameterError, match="works with cache none; cache 'block' is not one of them"):
        LLM("tiny-sdar", strategy="s2d2", cache="block", device="cpu")
    with pytest.raises(InvalidParameterError, match="strategy 's2d2' does not support llada models"):
        LLM("tiny-llada", strategy="s2d2", device="cpu").generate(["hi"], SamplingParams(max_tokens=4))


def test_cli_takes_the_strategy_and_its_preset():
    import subprocess
    import sys
    text = "What is 12 + 7?"
    want = s2d2({"preset": "config-a"}).generate([text], SamplingParams(max_tokens=16, temperature=0))[0]
    cli = [sys.executable, "-m", "dllm.cli", "generate", "--model", "tiny-sdar", "--device", "cpu",
           "--strategy", "s2d2"]
    r = subprocess.run(cli + ["--strategy-option", "preset=config-a", "--no-chat", "-p", text, "--max-tokens", "16",
                              "--temperature", "0", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["token_ids"] == want.token_ids
    assert out["metrics"]["strategy_stats"]["verify_calls"] == want.metrics.strategy_stats["verify_calls"] > 0
    bad = subprocess.run(cli + ["--strategy-option", "preset=nope", "-p", "hi"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "preset" in bad.stderr


def test_server_serves_the_preset_and_a_request_may_pick_s2d2():
    from fastapi.testclient import TestClient
    from dllm.server.app import build_app
    from dllm.server.engine_client import EngineClient
    prompt, sp = "What is 12 + 7?", SamplingParams(max_tokens=16, temperature=0)
    body = {"model": "m", "prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": True}
    want = s2d2({"preset": "config-a"}).generate([prompt], sp)[0]
    with TestClient(build_app(EngineClient(s2d2({"preset": "config-a"})), ["m"])) as http:   # serve --strategy s2d2
        got = http.post("/v1/completions", json=body)
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["token_ids"] == want.token_ids
    want = s2d2({}).generate([prompt], sp)[0]
    server = LLM("tiny-sdar", strategy="reference", device="cpu", dtype="float32")
    with TestClient(build_app(EngineClient(server), ["m"])) as http:    # a request picks s2d2 (default options)
        got = http.post("/v1/completions", json={**body, "strategy": "s2d2"})
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["token_ids"] == want.token_ids


def test_a_fallback_short_of_its_quota_still_finishes_the_block(monkeypatch):
    """entropy_bounded may commit fewer tokens than the quota: with 2 steps for blocks of 4 the authors' code then
    indexes its schedule past the end (IndexError) on this prompt; here the last quota is reused."""
    from dllm.decoding.s2d2 import S2D2Strategy
    steps_per_block, begin = [], S2D2Strategy.begin_block

    def record(self, masked):
        steps_per_block.append(self.step_index)
        begin(self, masked)

    monkeypatch.setattr(S2D2Strategy, "begin_block", record)
    sp = SamplingParams(max_tokens=24, block_length=4, steps=2, remasking="entropy_bounded", entropy_bound=0.5,
                        temperature=0, seed=72, ignore_eos=True)
    llm = s2d2({"min_ssd_span_length": 4})
    out = llm.generate([GOLDEN["prompts"][2]], sp)[0]
    assert len(out.token_ids) == 24 and llm.spec.mask_id not in out.token_ids
    assert max(steps_per_block) > 2

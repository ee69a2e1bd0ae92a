"""Learn2PD (`--strategy learn2pd`): token-exact parity at temperature 0 with an independent re-implementation of
the authors' samplers (tests/reference_learn2pd.py: `generate_learn2parallel`, `generate_l2p_eot`,
`generate_with_prefix_cache`, `generate_with_dual_cache`) on a tiny LLaDA checkpoint in the real layout, given the
same filter file; the filter file format and its refusals; the Dream path's invariants.

The checkpoint is the tests' tiny LLaDA with its EOS output row scaled up, so that end-of-text predictions (and so
EoTP's cuts, both the filter-accepted and the most-confident branch) happen within a few steps; the filter is
random with per-position biases, so that it accepts some positions and not others.
"""
from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import load_tiny_state_dict, special_token_ids, write_tiny_llada
from reference_learn2pd import RefFilter, l2p_generate, l2p_generate_cached
from reference_llada import RefLLaDA
from dllm import LLM, SamplingParams
from dllm.decoding.l2p_filter import Filter, FilterConfig, ParallelFilter, load_filter, save_filter
from dllm.errors import InvalidParameterError

BLOCK = 32


@pytest.fixture(scope="module")
def eos_llada(tmp_path_factory) -> pathlib.Path:
    path = write_tiny_llada(tmp_path_factory.mktemp("l2p") / "tiny-llada-eos", seed=1)
    sd = load_file(str(path / "model.safetensors"))
    eos = special_token_ids(path)["eos"]
    sd["model.transformer.ff_out.weight"][eos] *= 4.0
    save_file(sd, str(path / "model.safetensors"))
    return path


def make_filter(path, vocab: int, seed: int = 0, family: str = "llada", block: int = BLOCK) -> pathlib.Path:
    g = torch.Generator().manual_seed(seed)
    net = ParallelFilter(block)
    with torch.no_grad():
        net.linear1.weight.copy_(torch.randn(block, block, generator=g) * 2)
        net.linear1.bias.copy_(torch.randn(block, generator=g))
        net.linear2.weight.copy_(torch.randn(block, block, generator=g) * 0.5)
        net.linear2.bias.copy_(torch.randn(block, generator=g) * 3 + 1.5)
    cfg = FilterConfig(model="test", family=family, vocab_size=vocab, block_length=block)
    save_filter(path, Filter(cfg, net))
    return pathlib.Path(path).with_suffix(".json")


@pytest.fixture(scope="module")
def setup(eos_llada, tmp_path_factory):
    cfg, sd = load_tiny_state_dict(eos_llada)
    flt = make_filter(tmp_path_factory.mktemp("flt") / "filter", cfg["vocab_size"])
    ref_filter = RefFilter(load_file(str(flt.with_suffix(".safetensors"))))
    return RefLLaDA(cfg, sd), ref_filter, flt, special_token_ids(eos_llada)


def prompts(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 250, (length,), generator=g).tolist() for _ in range(n)]


def run_dllm(path, flt, cache, prompt, gen, steps, eotp=True, threshold=None):
    opts = {"filter": str(flt), "eotp": eotp}
    if threshold is not None:
        opts["threshold"] = threshold
    llm = LLM(str(path), strategy="learn2pd", cache=cache, device="cpu", dtype="float32", strategy_options=opts)
    out = llm.generate([prompt], SamplingParams(max_tokens=gen, block_length=BLOCK, steps=steps, temperature=0,
                                                ignore_eos=True))[0]
    return out


CASES = [(0, 64, 64), (1, 96, 96), (2, 64, 32)]   # (seed, gen_length, steps)


@pytest.mark.parametrize("eotp", [True, False])
def test_no_cache_matches_generate_l2p_eot_and_learn2parallel(eos_llada, setup, eotp):
    ref, ref_filter, flt, ids = setup
    total_cuts = 0
    for seed, gen, steps in CASES:
        prompt = prompts(1, 7 + seed, seed)[0]
        want, nfe, cuts = l2p_generate(ref, ref_filter, 0.96, torch.tensor([prompt]), steps, gen, BLOCK, ids["mask"],
                                       ids["eos"], eot=eotp)
        total_cuts += cuts
        out = run_dllm(eos_llada, flt, "none", prompt, gen, steps, eotp)
        assert out.token_ids == want[0, len(prompt):].tolist(), (seed, gen, steps)
        assert out.metrics.nfe == nfe
    assert (total_cuts > 0) == eotp            # EoTP did cut (and only when on)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_variants_match_the_authors_cached_samplers(eos_llada, setup, cache):
    ref, ref_filter, flt, ids = setup
    total_cuts = 0
    for seed, gen, steps in CASES:
        prompt = prompts(1, 7 + seed, seed)[0]
        want, nfe, cuts = l2p_generate_cached(ref, ref_filter, 0.96, torch.tensor([prompt]), steps, gen, BLOCK,
                                              ids["mask"], ids["eos"], cache)
        total_cuts += cuts
        out = run_dllm(eos_llada, flt, cache, prompt, gen, steps)
        assert out.token_ids == want[0, len(prompt):].tolist(), (cache, seed, gen, steps)
        assert out.metrics.nfe == nfe
    assert total_cuts > 0


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_a_row_decodes_the_same_alone_and_in_a_padded_batch(eos_llada, setup, cache):
    """Rows of one batch cut their canvases at different columns; each equals its own run."""
    _, _, flt, _ = setup
    llm = LLM(str(eos_llada), strategy="learn2pd", cache=cache, device="cpu", dtype="float32",
              strategy_options={"filter": str(flt)})
    sp = SamplingParams(max_tokens=96, block_length=BLOCK, temperature=0, ignore_eos=True)
    batch = [prompts(1, 8, 5)[0], prompts(1, 5, 6)[0], prompts(1, 8, 4)[0]]
    together = [o.token_ids for o in llm.generate(batch, sp)]
    alone = [llm.generate([p], sp)[0].token_ids for p in batch]
    assert together == alone
    assert len({len(t) for t in together}) >= 2                           # different cuts


def test_threshold_option_and_one_token_a_step(eos_llada, setup):
    ref, ref_filter, flt, ids = setup
    prompt = prompts(1, 9, 5)[0]
    want, nfe, _ = l2p_generate(ref, ref_filter, 0.5, torch.tensor([prompt]), 64, 64, BLOCK, ids["mask"], ids["eos"])
    out = run_dllm(eos_llada, flt, "none", prompt, 64, 64, threshold=0.5)
    assert out.token_ids == want[0, 9:].tolist() and out.metrics.nfe == nfe
    never = run_dllm(eos_llada, flt, "none", prompt, 64, 64, eotp=False, threshold=0.999999)
    assert never.metrics.nfe <= 64 and len(never.token_ids) == 64       # at least one token a step


def test_filter_file_round_trip_and_refusals(tmp_path, eos_llada):
    vocab = load_tiny_state_dict(eos_llada)[0]["vocab_size"]
    meta = make_filter(tmp_path / "f", vocab)
    flt = load_filter(meta)
    assert json.loads(meta.read_text())["block_length"] == BLOCK
    x = torch.rand(3, 20)
    padded = torch.cat([x, torch.zeros(3, BLOCK - 20)], 1)
    assert torch.equal(flt.net(x), flt.net(padded)[:, :20])              # zero padding of a short block
    assert sum(p.numel() for p in flt.net.parameters()) == 2 * (BLOCK * BLOCK + BLOCK)
    llm = LLM(str(eos_llada), strategy="learn2pd", device="cpu", strategy_options={"filter": str(meta)})
    with pytest.raises(InvalidParameterError, match="block_length 32"):
        llm.generate(["hi"], SamplingParams(max_tokens=32, block_length=16))
    other = make_filter(tmp_path / "g", vocab + 8)
    with pytest.raises(InvalidParameterError, match="vocabulary"):
        LLM(str(eos_llada), strategy="learn2pd", device="cpu", strategy_options={"filter": str(other)})
    with pytest.raises(InvalidParameterError, match="no Learn2PD filter"):
        LLM(str(eos_llada), strategy="learn2pd", device="cpu", strategy_options={"filter": str(tmp_path / "nope")})
    with pytest.raises(InvalidParameterError, match="needs a filter"):
        LLM(str(eos_llada), strategy="learn2pd", device="cpu")
    with pytest.raises(InvalidParameterError, match="threshold"):
        LLM(str(eos_llada), strategy="learn2pd", device="cpu", strategy_options={"filter": str(meta), "threshold": 2})


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_dream_decodes_every_position_within_the_forward_budget(tiny_dream, tmp_path, cache):
    """No published Learn2PD Dream sampler: the invariants (every position decoded, at least one a step)."""
    base = LLM(str(tiny_dream), strategy="reference", device="cpu", dtype="float32")
    meta = make_filter(tmp_path / "d", base.loaded.arch.vocab_size, family="dream")
    sp = SamplingParams(max_tokens=64, block_length=BLOCK, temperature=0, ignore_eos=True)
    out = LLM(str(tiny_dream), strategy="learn2pd", cache=cache, device="cpu", dtype="float32",
              strategy_options={"filter": str(meta), "eotp": False}).generate(["abc"], sp)[0]
    assert len(out.token_ids) == 64 and base.spec.mask_id not in out.token_ids
    assert out.metrics.nfe < 64                                           # the filter committed extra positions
    with pytest.raises(InvalidParameterError, match="llada model"):
        LLM(str(tiny_dream), strategy="learn2pd", device="cpu",
            strategy_options={"filter": str(make_filter(tmp_path / "l", base.loaded.arch.vocab_size))})


# --------------------------------------------------------------------------- training data and training

def test_replay_records_equal_the_authors_generator(tiny_llada):
    """`generate_data`'s records (step, 32 confidences, is_correct) on the same weights, the stall guard included;
    two prompts of different lengths decoded as one padded batch."""
    from reference_learn2pd import egp_records
    from reference_llada import llada_generate
    from dllm.train.filter import replay_records
    cfg, sd = load_tiny_state_dict(tiny_llada)
    ref, ids = RefLLaDA(cfg, sd), special_token_ids(tiny_llada)
    llm = LLM(str(tiny_llada), strategy="reference", cache="none", device="cpu", dtype="float32")
    batch = prompts(1, 6, 14) + prompts(1, 9, 12)
    got = replay_records(llm, batch, 64, BLOCK)
    stalls = 0
    for prompt, records in zip(batch, got):
        p = torch.tensor([prompt])
        target = llada_generate(ref, p, steps=64, gen_length=64, block_length=BLOCK, mask_id=ids["mask"],
                                eos_id=ids["eos"], eot_id=ids["eot"])
        want, stalled = egp_records(ref, p, target, 64, 64, BLOCK, ids["mask"])
        assert [(r["step"], r["is_correct"]) for r in records] == [(r["step"], r["is_correct"]) for r in want]
        assert torch.allclose(torch.tensor([r["confidence"] for r in records]),
                              torch.tensor([r["confidence"] for r in want]), atol=1e-5)
        stalls += stalled
    assert stalls > 0                                                      # the stall-guard path ran


def test_training_on_a_synthetic_set_converges():
    """Labels a fixed function of the features (position i is correct iff its confidence > 0.5 + i / 100): the
    2-layer filter can represent it, so held-out accuracy must clear 0.9 and beat the majority class by 0.2
    (the majority share here is about 0.65; the filter reaches about 0.94), and the loss must fall by more than half."""
    from dllm.train.filter import fit
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, BLOCK, generator=g)
    y = (x > 0.5 + torch.arange(BLOCK) / 100).float()
    net, report = fit(x, y, epochs=600, lr=3e-3, seed=0, threshold=0.5, device=torch.device("cpu"))
    assert report["final_loss"] < report["first_loss"] / 2
    assert report["test_accuracy"] > 0.9
    assert report["test_accuracy"] > report["test_majority_accuracy"] + 0.2
    assert report["records"] == 1000 and report["test"] == 100


def test_train_filter_cli_writes_a_usable_filter_and_resumes(tiny_llada, tmp_path, capsys):
    from dllm.cli import main
    out = tmp_path / "flt"
    argv = ["train-filter", "--model", str(tiny_llada), "--task", "arith", "--output", str(out), "--num-problems",
            "2", "--max-tokens", "32", "--epochs", "60", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["prompts"] == 2 and report["split"] == "train" and report["records"] >= 2
    data = tmp_path / "flt.data" / "records.jsonl"
    lines = data.read_text()
    assert main(argv) == 0                                                 # resumes: nothing replayed again
    assert data.read_text() == lines
    assert "held-out accuracy" in (tmp_path / "flt.md").read_text()          # the filter's card
    flt = load_filter(out)
    assert flt.config.block_length == BLOCK and flt.config.training["tasks"] == ["arith"]
    llm = LLM(str(tiny_llada), strategy="learn2pd", device="cpu", strategy_options={"filter": str(out) + ".json"})
    assert len(llm.generate(["hi"], SamplingParams(max_tokens=32, block_length=32))[0].token_ids) >= 1
    assert main(argv[:4] + ["nope"] + argv[5:]) == 2
    assert "unknown task" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
def test_zoo_models_ship_a_filter_with_a_card(name):
    from dllm.zoo import FILTERS_DIR
    flt = load_filter(FILTERS_DIR / f"{name}.json")
    assert flt.config.model == name and flt.config.block_length == BLOCK
    assert flt.config.training["split"] == "train"                              # never the test split
    assert "held-out accuracy" in (FILTERS_DIR / f"{name}.md").read_text()
    llm = LLM(name, strategy="learn2pd", device="cpu")                        # no filter given: the shipped one
    out = llm.chat([{"role": "user", "content": "What is 12 + 7?"}],
                   SamplingParams(max_tokens=64, block_length=BLOCK, temperature=0))[0]
    assert out.metrics.nfe < 64 and len(out.token_ids) >= 1

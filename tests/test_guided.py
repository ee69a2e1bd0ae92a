"""Guided diffusion (`strategy="guided"`) against the independent oracle `guided_generate` of
`reference_freecache.py` (run against the authors' flash-dlm-experimental@387beab): the same tokens at temperature 0
in both modes, with a real transformers causal LM as the guide; the zoo's tiny-ar guides tiny-llada."""
from __future__ import annotations

import pytest
import torch

from checkpoints import load_tiny_state_dict, special_token_ids
from dllm import LLM, SamplingParams
from dllm.errors import InvalidParameterError
from reference_dream import RefDream
from reference_freecache import guided_generate
from reference_llada import RefLLaDA


@pytest.fixture(scope="module")
def guide_dir(tmp_path_factory, tiny_llada):
    """A tiny random Qwen2ForCausalLM with the tiny checkpoints' vocabulary, saved in the Hugging Face layout."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg, _ = load_tiny_state_dict(tiny_llada)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=cfg["vocab_size"], hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    path = tmp_path_factory.mktemp("guide") / "tiny-guide"
    model.save_pretrained(path)
    return path


def prompt(n, seed=0):
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("mode", ["assisted", "speculative"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_guided_matches_the_oracle(tiny_llada, tiny_dream, guide_dir, family, mode):
    from transformers import AutoModelForCausalLM
    path = tiny_llada if family == "llada" else tiny_dream
    cfg, sd = load_tiny_state_dict(path)
    ids = special_token_ids(path)
    model = RefLLaDA(cfg, sd) if family == "llada" else RefDream(cfg, sd)
    guide = AutoModelForCausalLM.from_pretrained(guide_dir, dtype=torch.float32).eval()
    # LLaDA: the prompt's K/V frozen at step 0 (the authors' cached path = cache "freecache" with one block);
    # Dream: the authors' cached path reads the first answer logit from itself, so compare their uncached path.
    cache, use_cache = ("freecache", True) if family == "llada" else ("none", False)
    llm = LLM(str(path), cache=cache, strategy="guided", strategy_options={"guide": str(guide_dir), "mode": mode},
              device="cpu", dtype="float32")
    for plen, gen in ((6, 12), (9, 16)):
        p = prompt(plen, seed=plen)
        x, nfe, _ = guided_generate(model, guide, torch.tensor([p]), gen, ids["mask"], None, mode=mode,
                                    use_cache=use_cache)
        out = llm.generate([p], SamplingParams(max_tokens=gen, block_length=gen, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == x[0, plen:].tolist()
        assert out.metrics.nfe == nfe["dream"]


def test_guided_rows_are_batch_independent(tiny_llada, guide_dir):
    llm = LLM(str(tiny_llada), strategy="guided", strategy_options={"guide": str(guide_dir)}, device="cpu",
              dtype="float32")
    params = SamplingParams(max_tokens=16, block_length=16, temperature=0, ignore_eos=True)
    prompts = [prompt(n, seed=n) for n in (4, 11, 7)]
    for p, out in zip(prompts, llm.generate(prompts, params)):
        assert out.token_ids == llm.generate([p], params)[0].token_ids


def test_tiny_ar_guides_tiny_llada():
    """The zoo pair: the guide accepts several proposals a step and the answers stay right."""
    torch.set_num_threads(2)
    from dllm.eval.tasks import get_task
    from dllm.eval.tasks.chat import to_messages
    task = get_task("arith")
    problems = task.generate("test", 8)
    llm = LLM("tiny-llada", cache="freecache", strategy="guided", strategy_options={"guide": "tiny-ar"}, device="cpu")
    outs = llm.chat([to_messages(p) for p in problems], SamplingParams(max_tokens=128, block_length=128, temperature=0))
    assert sum(task.check(p, o.text) for p, o in zip(problems, outs)) >= 7
    assert sum(o.metrics.num_tokens for o in outs) / sum(o.metrics.nfe for o in outs) > 2


def test_guided_needs_a_guide(tiny_llada, tiny_sdar, guide_dir):
    with pytest.raises(InvalidParameterError, match="needs a guide"):
        LLM(str(tiny_llada), strategy="guided", device="cpu")
    with pytest.raises(InvalidParameterError, match="mode"):
        LLM(str(tiny_llada), strategy="guided", strategy_options={"guide": str(guide_dir), "mode": "x"}, device="cpu")
    with pytest.raises(InvalidParameterError, match="no option"):
        LLM(str(tiny_llada), strategy="guided", strategy_options={"guid": "tiny-ar"}, device="cpu")
    with pytest.raises(InvalidParameterError, match="cannot load the guide"):
        LLM(str(tiny_llada), strategy="guided", strategy_options={"guide": "/nonexistent/guide"}, device="cpu")
    with pytest.raises(InvalidParameterError, match="sdar"):
        LLM(str(tiny_sdar), strategy="guided", strategy_options={"guide": str(guide_dir)}, device="cpu").generate(
            ["hi"], SamplingParams(max_tokens=8))

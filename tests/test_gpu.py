"""GPU checks (run on an accelerator only; skipped elsewhere): every strategy x cache decodes on CUDA in
bfloat16 and float32, fills every mask, and keeps rows independent of their batch."""
from __future__ import annotations

import itertools

import pytest

from dllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [[7, 3, 99, 12, 5], [42] * 13, list(range(1, 20))]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("cache,strategy", list(itertools.product(["none", "prefix", "dual"],
                                                                  ["reference", "threshold", "factor"])))
def test_decodes_on_cuda(tiny_llada, dtype, cache, strategy):
    llm = LLM(str(tiny_llada), cache=cache, strategy=strategy, device="cuda", dtype=dtype)
    sp = SamplingParams(max_tokens=16, block_length=4, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp)
    alone = [llm.generate([p], sp)[0].token_ids for p in PROMPTS]
    assert all(len(o.token_ids) == 16 and llm.spec.mask_id not in o.token_ids for o in outs)
    if dtype == "float32":
        assert [o.token_ids for o in outs] == alone


def test_cuda_matches_cpu_in_float32(tiny_llada):
    sp = SamplingParams(max_tokens=16, block_length=4, ignore_eos=True)
    cpu = LLM(str(tiny_llada), device="cpu", dtype="float32").generate(PROMPTS, sp)
    gpu = LLM(str(tiny_llada), device="cuda", dtype="float32").generate(PROMPTS, sp)
    assert [o.token_ids for o in cpu] == [o.token_ids for o in gpu]

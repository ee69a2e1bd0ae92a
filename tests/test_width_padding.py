"""The runner pads a cached forward's fed width to a bucket on CUDA (`runner.width_bucket`: a few graphs instead of
one per width) by repeating each row's last fed slot. Checked here on the CPU with the padding switched on: every
family and every cache that feeds a varying width emits exactly the tokens of the unpadded run (float32, zoo
models), and padding did happen."""
from __future__ import annotations

import pytest

import dllm.runner as runner_module
from dllm import LLM, SamplingParams
from dllm.runner import width_bucket
from dllm.zoo import bundled_path

CASES = [("tiny-llada", "prefix", 8), ("tiny-llada", "dual", 8), ("tiny-llada", "dkv", 8),
         ("tiny-llada", "freecache", 8), ("tiny-dream", "prefix", 8), ("tiny-dream", "dkv", 8),
         ("tiny-sdar", "prefix", 4)]
PROMPTS = ["12+35=", "What is 7 times 8?", "def add(a, b):"]


def test_width_bucket():
    assert [width_bucket(w) for w in (1, 4, 16, 17, 32, 33, 100)] == [1, 4, 16, 32, 32, 64, 128]


@pytest.mark.parametrize("model,cache,block", CASES)
def test_padded_widths_change_no_token(model, cache, block, monkeypatch):
    llm = LLM(str(bundled_path(model)), cache=cache, strategy="threshold", dtype="float32")
    sp = SamplingParams(max_tokens=24, block_length=block, threshold=0.9, temperature=0)
    plain = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp)]
    padded_calls = []
    original = runner_module._pad_width

    def counting(ids, positions, write, mask, width):
        out = original(ids, positions, write, mask, width)
        padded_calls.append(out[0].shape[1] > ids.shape[1])
        return out

    monkeypatch.setattr(runner_module, "_pad_width", counting)
    llm.engine.runner.pad_widths = True
    try:
        padded = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp)]
    finally:
        llm.engine.runner.pad_widths = False
    assert any(padded_calls), "no forward was padded: the test checks nothing"
    assert padded == plain


def test_span_buckets_are_between_the_rows_and_their_power_of_two():
    from dllm.runner import batch_bucket, span_bucket

    sizes = [span_bucket(n) for n in range(1, 129)]
    assert sorted(set(sizes)) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    assert all(n <= span_bucket(n) <= batch_bucket(n) for n in range(1, 129))

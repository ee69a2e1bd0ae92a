"""The paper caches on the zoo models: at its default settings each cache keeps the accuracy of the same strategy
without a cache (within 2 points on 50 held-out problems of arith and gsm-lite) while computing fewer token x
layer keys/values. BENCHMARKS.md has the full table (200 problems, GPU, the reference sampler too); this is the
CI-sized check, with threshold decoding (a few forwards an answer, so it fits the CPU budget)."""
from __future__ import annotations

import functools

import pytest
import torch

from dllm import LLM, SamplingParams
from dllm.eval.tasks import get_task
from dllm.eval.tasks.chat import to_messages

PROBLEMS = 50
_LLMS: dict = {}


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


@functools.cache
def run(model, task_name, cache):
    """(accuracy, total token x layer K/V computations) of threshold decoding at 0.9 with `cache`."""
    if (model, cache) not in _LLMS:
        _LLMS[model, cache] = LLM(model, cache=cache, strategy="threshold", device="cpu", max_batch_size=PROBLEMS)
    task = get_task(task_name)
    problems = task.generate("test", PROBLEMS)
    params = SamplingParams(max_tokens=128, block_length=32, temperature=0, threshold=0.9)
    outs = _LLMS[model, cache].chat([to_messages(p) for p in problems], params)
    accuracy = sum(task.check(p, o.text) for p, o in zip(problems, outs)) / len(problems)
    return accuracy, sum(o.metrics.kv_computations for o in outs)


@pytest.mark.parametrize("model", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("task", ["arith", "gsm-lite"])
@pytest.mark.parametrize("cache", ["dkv", "freecache", "elastic"])
def test_cache_keeps_accuracy_and_saves_compute(model, task, cache):
    base_accuracy, base_kv = run(model, task, "none")
    accuracy, kv = run(model, task, cache)
    assert accuracy >= base_accuracy - 0.02, f"{model} {task} {cache}: {accuracy:.2f} vs {base_accuracy:.2f}"
    assert kv < base_kv, f"{cache} computed {kv} token x layer K/V, no cache {base_kv}"

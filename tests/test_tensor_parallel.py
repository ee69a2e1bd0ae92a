"""Tensor parallelism on the CPU (gloo, spawned worker ranks): the bundled zoo models decode the same tokens with
2 (and 4) ranks as with one, in float32, for every cache and strategy that tensor parallelism serves; bad sizes
and a dead rank are one-line errors. One group per process, so each family's group lives for one test function."""
from __future__ import annotations

import time

import pytest
import torch

from dllm import LLM, SamplingParams
from dllm.cache import CACHES
from dllm.distributed import DistributedError
from dllm.engine import Engine
from dllm.errors import InvalidParameterError

MESSAGES = [[{"role": "user", "content": "What is 12 + 7?"}], [{"role": "user", "content": "Say cat."}]]
FAMILY = {"tiny-llada": "full", "tiny-dream": "full", "tiny-sdar": "block_causal"}


def _settings(model: str):
    caches = [n for n, c in CACHES.items() if FAMILY[model] in c.attentions and c.tensor_parallel]
    block = 4 if model == "tiny-sdar" else 8
    for cache in caches:
        for strategy in ("reference", "threshold", "factor"):
            yield cache, strategy, SamplingParams(max_tokens=16, block_length=block, temperature=0)


def _decode_all(llm: LLM, model: str) -> dict:
    out = {}
    for cache, strategy, sp in _settings(model):
        engine = Engine(llm.loaded, cache=cache, strategy=strategy, runner=llm.engine.runner)
        llm.engine = engine
        out[(cache, strategy)] = [o.token_ids for o in llm.chat(MESSAGES, sp)]
    return out


@pytest.mark.parametrize("model,size", [("tiny-llada", 2), ("tiny-dream", 2), ("tiny-sdar", 2), ("tiny-llada", 4)])
def test_tensor_parallel_decodes_the_single_process_tokens(model, size):
    want = _decode_all(LLM(model, device="cpu", dtype="float32"), model)
    llm = LLM(model, device="cpu", dtype="float32", tensor_parallel_size=size)
    try:
        assert llm.loaded.model.layers[0].attn.num_heads == llm.loaded.arch.num_heads // size
        got = _decode_all(llm, model)
    finally:
        llm.shutdown()
    assert got == want


def test_bad_sizes_and_caches_are_one_line_errors():
    with pytest.raises(InvalidParameterError, match="does not divide the model's 8 attention heads"):
        LLM("tiny-llada", device="cpu", tensor_parallel_size=3)
    with pytest.raises(InvalidParameterError, match="positive integer"):
        LLM("tiny-llada", device="cpu", tensor_parallel_size=0)
    llm = LLM("tiny-llada", device="cpu", dtype="float32", tensor_parallel_size=2)
    try:
        with pytest.raises(InvalidParameterError, match="tensor_parallel_size=1"):
            Engine(llm.loaded, cache="elastic", runner=llm.engine.runner)
        with pytest.raises(DistributedError, match="already running"):
            LLM("tiny-llada", device="cpu", tensor_parallel_size=2)
        # a rank that dies: the next request fails in one line, quickly, and nothing hangs
        worker = llm.engine.runner.group.processes[0]
        worker.kill()
        worker.join(timeout=10)
        start = time.perf_counter()
        with pytest.raises(DistributedError, match="died"):
            llm.generate(["hi"], SamplingParams(max_tokens=8, block_length=8))
        assert time.perf_counter() - start < 5
    finally:
        llm.shutdown()


def test_weights_are_sharded_not_copied():
    """Each rank holds its slice: rank 0's q/k/v, MLP and vocabulary rows are the matching rows of the full model."""
    full = LLM("tiny-sdar", device="cpu", dtype="float32")
    llm = LLM("tiny-sdar", device="cpu", dtype="float32", tensor_parallel_size=2)
    try:
        a, b = full.loaded.model, llm.loaded.model
        arch = full.loaded.arch
        d, hkv = arch.head_dim, arch.num_kv_heads
        fq, sq = a.layers[0].attn.qkv_proj.weight, b.layers[0].attn.qkv_proj.weight
        h_local, kv_local = arch.num_heads // 2, hkv // 2
        torch.testing.assert_close(sq[:h_local * d], fq[:h_local * d])                    # first query heads
        k_full = fq[arch.num_heads * d:(arch.num_heads + kv_local) * d]
        torch.testing.assert_close(sq[h_local * d:(h_local + kv_local) * d], k_full)        # first K/V heads
        assert b.embed.weight.shape[0] == arch.vocab_size // 2
        torch.testing.assert_close(b.lm_head.weight, a.lm_head.weight[:arch.vocab_size // 2])
    finally:
        llm.shutdown()


SCRIPT = """
import json, sys
from dllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM("tiny-llada", device="cpu", dtype="float32", cache="dual", strategy="threshold",
              tensor_parallel_size=2)
    out = llm.generate(["12 + 7 =", "Say cat."], SamplingParams(max_tokens=16, block_length=8, temperature=0))
    print("TOKENS " + json.dumps([o.token_ids for o in out]))
"""


def test_torchrun_launch(tmp_path):
    """`torchrun --nproc-per-node 2 script.py`: rank 0 runs the script, rank 1 serves inside LLM() and exits."""
    import json
    import subprocess
    import sys
    script = tmp_path / "tp_script.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("TOKENS "))
    want = LLM("tiny-llada", device="cpu", dtype="float32", cache="dual", strategy="threshold").generate(
        ["12 + 7 =", "Say cat."], SamplingParams(max_tokens=16, block_length=8, temperature=0))
    assert json.loads(line[7:]) == [o.token_ids for o in want]

"""What the real-shape GPU benchmarks share: a model built from a checkpoint directory's config files with random
weights (`load_format="dummy"`; no weights are read), and the setting the step benchmarks decode (random prompts,
the reference strategy's schedule at one token a step, `ignore_eos`, temperature 0)."""
from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dllm import LLM, SamplingParams  # noqa: E402


def dummy_llm(config_dir: str | pathlib.Path, **kwargs) -> LLM:
    """`LLM` over `config_dir`'s config.json (and generation_config.json) with random weights; `kwargs` go to
    `LLM` (device, dtype, cache, strategy, ...)."""
    work = pathlib.Path(tempfile.mkdtemp())
    for name in ("config.json", "generation_config.json"):
        if (pathlib.Path(config_dir) / name).is_file():
            shutil.copy(pathlib.Path(config_dir) / name, work / name)
    return LLM(str(work), load_format="dummy", skip_tokenizer_init=True, **kwargs)


def one_token_a_step(llm: LLM, batch: int, prompt_len: int, gen: int, block: int
                     ) -> tuple[list[list[int]], SamplingParams]:
    """`batch` random prompts of `prompt_len` tokens and parameters that commit one token a step (Dream: the
    maskgit_plus rule, whose default `origin` commits a random count; SDAR: `block` steps a block)."""
    vocab = llm.loaded.arch.vocab_size
    prompts = [torch.randint(2, vocab - 2, (prompt_len,)).tolist() for _ in range(batch)]
    extra = {"alg": "maskgit_plus"} if llm.spec.family == "dream" else {}
    steps = gen if llm.spec.family != "sdar" else block
    return prompts, SamplingParams(max_tokens=gen, block_length=block, steps=steps, ignore_eos=True, temperature=0,
                                   **extra)

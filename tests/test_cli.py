"""The real `dllm` entry point, run as a subprocess: success paths and a one-line error for each bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def dllm(*args, stdin=None, env=None):
    exe = shutil.which("dllm") or None
    cmd = [exe, *args] if exe else [sys.executable, "-m", "dllm.cli", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300, env={**ENV, **(env or {})})


def test_generate_json(tiny_llada):
    r = dllm("generate", "--model", str(tiny_llada), "-p", "hello", "-p", "a longer prompt", "--max-tokens", "16",
             "--block-length", "4", "--cache", "dual", "--strategy", "threshold", "--threshold", "0.8", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == ["hello", "a longer prompt"]
    for row in rows:
        assert 1 <= len(row["token_ids"]) <= 16 and row["finish_reason"] in ("stop", "length")
        assert row["metrics"]["nfe"] >= 1 and "tokens_per_second" in row["metrics"]


def test_generate_matches_the_api(tiny_llada):
    from dllm import LLM, SamplingParams
    want = LLM(str(tiny_llada), strategy="reference").chat([{"role": "user", "content": "hi"}],
                                                           SamplingParams(max_tokens=16, block_length=8, steps=8))[0]
    r = dllm("generate", "--model", str(tiny_llada), "--strategy", "reference", "--chat", "--max-tokens", "16",
             "--block-length", "8", "--steps", "8",
             "--json", stdin="hi")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == want.token_ids


@pytest.mark.parametrize("cache,options", [("dkv", ["refresh_interval=4"]), ("elastic", ["window_length=4", "gamma=0.5"]),
                                           ("freecache", [])])
def test_paper_caches_take_their_options(tiny_llada, cache, options):
    """One token a step (the reference sampler), so every cache has steps to reuse keys in."""
    from dllm import LLM, SamplingParams
    parsed = {k: float(v) if "." in v else int(v) for k, v in (o.split("=") for o in options)}
    want = LLM(str(tiny_llada), cache=cache, strategy="reference", cache_options=parsed).generate(
        ["hello"], SamplingParams(max_tokens=16, block_length=8, steps=16, temperature=0))[0]
    flags = [x for o in options for x in ("--cache-option", o)]
    r = dllm("generate", "--model", str(tiny_llada), "--no-chat", "-p", "hello", "--max-tokens", "16", "--strategy",
             "reference", "--block-length", "8", "--steps", "16", "--temperature", "0", "--cache", cache, *flags, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["token_ids"] == want.token_ids and out["metrics"]["kv_fraction"] < 1


def test_chat_session(tiny_llada):
    r = dllm("chat", "--model", str(tiny_llada), "--max-tokens", "8", "--block-length", "4", stdin="hello\n/reset\nagain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("tokens/s]") == 2


@pytest.mark.parametrize("args,message", [
    (["--max-tokens", "30", "--block-length", "8"], "not divisible by block_length 8"),
    (["--strategy", "reference", "--max-tokens", "32", "--block-length", "8", "--steps", "6"],
     "not a multiple of the number of blocks"),
    (["--max-tokens", "512"], "exceeds the model's context"),
    (["--cache", "lru"], "unknown cache 'lru'; choose one of: none, prefix, dual"),
    (["--strategy", "greedy"], "unknown strategy 'greedy'"),
    (["--max-tokens", "many"], "invalid int value"),
    (["--strategy", "reference", "--threshold", "0.9"], "threshold does not apply to strategy 'reference'"),
    (["--steps", "8"], "steps does not apply to strategy 'factor'"),   # the default on LLaDA (dllm/defaults.py)
    (["--cache", "dkv", "--cache-option", "window=2"], "cache 'dkv' has no option 'window'"),
    (["--cache", "elastic", "--cache-option", "gamma=high"], "cache option gamma='high' must be a float"),
    (["--cache", "dkv", "--cache-option", "refresh_interval"], "--cache-option 'refresh_interval' is not KEY=VALUE"),
    (["--strategy", "guided"], "strategy 'guided' needs a guide model"),
    (["--strategy", "saber", "--strategy-option", "mu=0"], "saber option mu=0 must be an integer >= 1"),
    (["--strategy", "saber", "--cache", "dual"], "cache 'dual' does not compute them: use cache none"),
    (["--device", "cpu:7"], "device 'cpu:7' does not exist: PyTorch has one CPU device ('cpu')"),
    (["--dtype", "int3"], "unknown dtype 'int3'; use one of auto, bfloat16, float16, float32, float64"),
])
def test_bad_options_are_one_line(tiny_llada, args, message):
    r = dllm("generate", "--model", str(tiny_llada), "-p", "hello there", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_cpu_0_is_the_cpu(tiny_llada):
    r = dllm("generate", "--model", str(tiny_llada), "-p", "hello", "--max-tokens", "8", "--block-length", "8",
             "--device", "cpu:0", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) >= 1


@pytest.mark.parametrize("args", [["--chat", ""], ["--no-chat", ""], ["hello", "-p", "  "]])
def test_empty_prompt_is_one_line(tiny_llada, args):
    r = dllm("generate", "--model", str(tiny_llada), *args)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: prompt ") and "is empty" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_api_refuses_an_empty_prompt(tiny_llada):
    from dllm import LLM
    with pytest.raises(ValueError, match="the prompt is empty"):
        LLM(str(tiny_llada)).generate("")


def test_a_file_as_model_says_it_is_a_file(tiny_llada):
    r = dllm("generate", "--model", str(tiny_llada / "config.json"), "-p", "x")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: model '{tiny_llada / 'config.json'}' is a file; pass the checkpoint directory that holds config.json "
        f"(here: '{tiny_llada}')")


def test_missing_path(tmp_path):
    r = dllm("generate", "--model", str(tmp_path / "nope"), "-p", "x")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: model directory '{tmp_path / 'nope'}' does not exist; pass a checkpoint directory or a hub id "
        "like GSAI-ML/LLaDA-8B-Instruct")


def test_other_family(tiny_llada, tmp_path):
    other = tmp_path / "sdar"
    shutil.copytree(tiny_llada, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(cfg))
    r = dllm("generate", "--model", str(other), "-p", "x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "model_type 'mistral'" in r.stderr and "supported families" in r.stderr


def test_cuda_without_gpu(tiny_llada):
    # No visible device: the check runs (not skips) on a GPU machine too.
    r = dllm("generate", "--model", str(tiny_llada), "-p", "x", "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: CUDA was requested but no GPU is available here; pass device='cpu' (CLI: --device cpu)")


def test_no_prompt(tiny_llada):
    r = dllm("generate", "--model", str(tiny_llada), stdin="")
    assert r.returncode == 2 and "no prompt given" in r.stderr

"""Tensor parallelism at a real shape: token parity of TP=N against TP=1 and the step-time scaling table.

LLaDA-8B's real config.json with random weights (`load_format="dummy"`: every tensor-parallel size builds the same
weights). Parity: greedy decoding of `--prompts` random prompts with the dual cache and threshold strategy in the
benchmark dtype, fraction of rows identical to TP=1 and where the first differences appear; then the same in
float32 when bf16 is not 100% identical. Scaling: ms per step for the dual and no-cache paths at each batch size,
TP=1 against TP=N, with each one's floor (weight bytes per rank / copy bandwidth) and, from a profile of rank 0,
the all-reduce (NCCL kernel) time per step.

    python benchmarks/tp_scaling.py --config-dir tests/data/checkpoints/LLaDA-8B-Instruct --tp 2

Needs N GPUs (NCCL; keep NVLink multicast off: NCCL_NVLS_ENABLE=0). `--device cpu` runs the same code on gloo to
smoke-test the script. Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dllm import LLM, SamplingParams  # noqa: E402
from dllm.engine import Engine  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bandwidth(device: str) -> float:
    n = (2 << 30) if device == "cuda" else (1 << 26)
    src = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * n * 10 / (time.perf_counter() - t)


def build(work: str, tp: int, dtype: str, device: str) -> LLM:
    return LLM(work, dtype=dtype, device=device, load_format="dummy", skip_tokenizer_init=True,
               tensor_parallel_size=tp, cache="dual", strategy="threshold")


def decode(llm: LLM, prompts, gen: int, block: int) -> list[list[int]]:
    sp = SamplingParams(max_tokens=gen, block_length=block, temperature=0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, sp)]


def step_ms(llm: LLM, cache: str, batch: int, prompt: int, gen: int, block: int, device: str) -> tuple[float, float]:
    """(ms per step, all-reduce ms per step) of the reference strategy at one token a step."""
    llm.engine = Engine(llm.loaded, cache=cache, strategy="reference", runner=llm.engine.runner)
    vocab = llm.loaded.arch.vocab_size
    prompts = [torch.randint(2, vocab - 2, (prompt,)).tolist() for _ in range(batch)]
    sp = SamplingParams(max_tokens=gen, block_length=block, steps=gen, ignore_eos=True, temperature=0)
    llm.generate(prompts, sp)
    sync(device)
    t = time.perf_counter()
    nfe = llm.generate(prompts, sp)[0].metrics.nfe
    sync(device)
    ms = (time.perf_counter() - t) / nfe * 1e3
    reduce_ms = 0.0
    if device == "cuda" and llm.engine.runner.group is not None:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, sp)
            sync(device)
        kernels = [e for e in prof.key_averages() if "nccl" in e.key.lower() and "allreduce" in e.key.lower()]
        reduce_ms = sum(e.self_device_time_total for e in kernels) / nfe / 1e3
    return ms, reduce_ms


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-dir", default=str(REPO / "tests" / "data" / "checkpoints" / "LLaDA-8B-Instruct"))
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--step-gen", type=int, default=64, help="tokens decoded per timed run (same canvas length)")
    ap.add_argument("--block", type=int, default=32)
    args = ap.parse_args()

    work = tempfile.mkdtemp()
    for name in ("config.json", "generation_config.json"):
        if (pathlib.Path(args.config_dir) / name).is_file():
            shutil.copy(pathlib.Path(args.config_dir) / name, pathlib.Path(work) / name)
    bw = bandwidth(args.device)
    g = torch.Generator().manual_seed(0)
    vocab = json.loads((pathlib.Path(work) / "config.json").read_text()).get("embedding_size") or 126464
    prompts = [torch.randint(2, vocab - 2, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    canvas_prompt = args.prompt_len + args.gen - args.step_gen
    result = {"device": args.device, "dtype": args.dtype, "tp": args.tp, "copy_bandwidth_GBps": round(bw / 1e9, 1)}
    tokens, rows = {}, []
    for tp in (1, args.tp):
        llm = build(work, tp, args.dtype, args.device)
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.loaded.model.parameters())
        tokens[tp] = decode(llm, prompts, args.gen, args.block)
        for cache in ("dual", "none"):
            for batch in args.batch_sizes:
                ms, reduce_ms = step_ms(llm, cache, batch, canvas_prompt, args.step_gen, args.block, args.device)
                rows.append({"tp": tp, "cache": cache, "batch": batch, "ms_per_step": round(ms, 2),
                             "floor_ms": round(weight_bytes / bw * 1e3, 2), "all_reduce_ms_per_step": round(reduce_ms, 3)})
                print(f"TP={tp} {cache:5s} b{batch:<3d} {ms:8.2f} ms/step  floor {weight_bytes / bw * 1e3:6.2f} ms  "
                      f"all-reduce {reduce_ms:6.3f} ms/step", flush=True)
        llm.shutdown()
        del llm
        if args.device == "cuda":
            torch.cuda.empty_cache()
    same = [a == b for a, b in zip(tokens[1], tokens[args.tp])]
    diffs = [first_difference(a, b) for a, b in zip(tokens[1], tokens[args.tp])]
    result.update({"identical_fraction": sum(same) / len(same), "first_differences": [d for d in diffs if d is not None],
                   "steps": rows})
    print(f"TP={args.tp} vs TP=1 in {args.dtype}: {sum(same)}/{len(same)} rows identical")
    if not all(same) and args.dtype != "float32":
        fp = {tp: None for tp in (1, args.tp)}
        for tp in fp:
            llm = build(work, tp, "float32", args.device)
            fp[tp] = decode(llm, prompts, args.gen, args.block)
            llm.shutdown()
            del llm
        same32 = [a == b for a, b in zip(fp[1], fp[args.tp])]
        result["identical_fraction_float32"] = sum(same32) / len(same32)
        print(f"float32: {sum(same32)}/{len(same32)} rows identical")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

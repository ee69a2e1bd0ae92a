"""Denoising step time of a real-shape model (random weights) per cache policy and batch size.

Builds the model from a checkpoint directory's config.json (default: the real LLaDA-8B-Instruct config in
../shared) with `load_format="dummy"`, decodes random prompts through the public API with the reference
strategy at one token a step (random weights are never confident, so every strategy commits one token a step),
and reports ms per denoising step and tokens/s. It also times the two kinds of forward a cached block makes
(full canvas at block start, the short window after) and measures the device's copy bandwidth, which gives the
weight-read floor of one step: bytes of weights / bandwidth.

    python benchmarks/step_time.py --device cuda --batch-sizes 1 8

Prints a table, then one JSON object as the last line.
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

from dllm.cache import make_cache  # noqa: E402
from dllm import LLM, SamplingParams  # noqa: E402

DEFAULT_CONFIG = REPO.parent / "shared" / "data" / "checkpoints" / "LLaDA-8B-Instruct"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, size_bytes=2 << 30, repeats=10) -> float:
    """Bytes moved per second by a device-to-device copy (read + write counted)."""
    src = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * size_bytes * repeats / (time.perf_counter() - t)


def time_forward(llm, batch, length, start, end, cache_name, step, repeats):
    """Mean seconds of one model forward as `cache_name` plans it at block step `step`."""
    model, arch = llm.loaded.model, llm.loaded.arch
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    policy = make_cache(cache_name)
    policy.allocate(batch, length, arch, llm.loaded.spec, dtype, device)
    tokens = torch.randint(0, arch.vocab_size, (batch, length), device=device)
    positions = torch.arange(length, device=device).expand(batch, length)
    plan = policy.plan(start, end, step, lambda *_: None)  # no padding: every key visible
    run = lambda: model(tokens[:, plan.start:plan.end], positions[:, plan.start:plan.end], plan,  # noqa: E731
                        logits_range=(start - plan.start, end - plan.start))
    with torch.no_grad():
        run()
        sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            run()
        sync(device)
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-dir", default=str(DEFAULT_CONFIG), help="directory with the real config.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--caches", nargs="+", default=["none", "prefix", "dual"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--output", default=None, help="also write the JSON result here")
    args = ap.parse_args()

    work = pathlib.Path(tempfile.mkdtemp())
    for name in ("config.json", "generation_config.json"):
        if (pathlib.Path(args.config_dir) / name).is_file():
            shutil.copy(pathlib.Path(args.config_dir) / name, work / name)
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {gpu}, torch {torch.__version__}, dtype {args.dtype}, prompt {args.prompt_len}, "
          f"gen {args.gen_length}, block {args.block_length}, one token a step")
    results = []
    T, P, G, Lb = args.prompt_len + args.gen_length, args.prompt_len, args.gen_length, args.block_length
    for cache in args.caches:
        llm = LLM(str(work), cache=cache, strategy="reference", dtype=args.dtype, device=args.device,
                  load_format="dummy", skip_tokenizer_init=True)
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.loaded.model.parameters())
        floor_ms = weight_bytes / bandwidth * 1e3 if bandwidth else None
        for batch in args.batch_sizes:
            g = torch.Generator().manual_seed(batch)
            prompts = [torch.randint(0, llm.loaded.arch.vocab_size, (P,), generator=g).tolist() for _ in range(batch)]
            warm = SamplingParams(max_tokens=Lb, block_length=Lb, steps=2, ignore_eos=True)
            llm.generate(prompts, warm)
            sp = SamplingParams(max_tokens=G, block_length=Lb, steps=G, ignore_eos=True)
            sync(device)
            t = time.perf_counter()
            outs = llm.generate(prompts, sp)
            sync(device)
            wall = time.perf_counter() - t
            nfe = outs[0].metrics.nfe
            # the two forward shapes of the Fast-dLLM caches; the others' shapes depend on the decoded state
            timed = cache in ("none", "prefix", "dual")
            full_ms = time_forward(llm, batch, T, P, P + Lb, cache, 0, 3) * 1e3 if timed else float("nan")
            short_ms = time_forward(llm, batch, T, P, P + Lb, cache, 1, 5) * 1e3 if timed else float("nan")
            kv_fraction = sum(o.metrics.kv_fraction for o in outs) / len(outs)
            row = {"cache": cache, "batch": batch, "nfe": nfe, "wall_s": round(wall, 3),
                   "ms_per_step": round(wall / nfe * 1e3, 2),
                   "block_start_forward_ms": round(full_ms, 2) if timed else None,
                   "in_block_forward_ms": round(short_ms, 2) if timed else None, "kv_fraction": round(kv_fraction, 3),
                   "tokens_per_s": round(batch * G / wall, 1), "tokens_per_s_per_request": round(G / wall, 1),
                   "floor_ms": floor_ms and round(floor_ms, 2),
                   "step_over_floor": floor_ms and round(wall / nfe * 1e3 / floor_ms, 2)}
            results.append(row)
            print(f"cache {cache:9s} batch {batch:2d}: {row['ms_per_step']:8.2f} ms/step "
                  f"(block start {full_ms:7.2f} ms, in block {short_ms:7.2f} ms), kv fraction {kv_fraction:.3f}, "
                  f"{row['tokens_per_s']:8.1f} tok/s, "
                  f"floor {row['floor_ms']} ms, step/floor {row['step_over_floor']}")
        del llm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = {"device": gpu, "torch": torch.__version__, "dtype": args.dtype, "prompt_len": P, "gen_length": G,
               "block_length": Lb, "weight_bytes": weight_bytes, "copy_bandwidth_GBps": bandwidth and round(bandwidth / 1e9, 1),
               "results": results}
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

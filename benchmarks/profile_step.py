"""Where a denoising step's time goes: torch.profiler over whole steps of one real-shape model (random weights),
in the runner's eager mode (every kernel launched from Python) and graph mode (replays).

Prints, per mode: kernels launched per step, device (kernel) time and host time per step, and the top kernels
by device time; then one JSON object as the last line.

    python benchmarks/profile_step.py --config-dir tests/data/checkpoints/LLaDA-8B-Instruct --cache dual --batch 1
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dllm.engine import Engine  # noqa: E402
from real_shape import dummy_llm, one_token_a_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-dir", default=str(REPO / "tests" / "data" / "checkpoints" / "LLaDA-8B-Instruct"))
    ap.add_argument("--cache", default="dual")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"])
    args = ap.parse_args()

    llm = dummy_llm(args.config_dir, device="cuda", dtype="bfloat16")
    prompts, sp = one_token_a_step(llm, args.batch, args.prompt_len, args.gen, args.block)
    report = {}
    for mode in args.modes:
        llm.engine = Engine(llm.loaded, cache=args.cache, strategy="reference", enforce_eager=(mode == "eager"))
        llm.generate(prompts, sp)
        llm.generate(prompts, sp)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            out = llm.generate(prompts, sp)[0]
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        nfe = out.metrics.nfe
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        device_us = sum(e.self_device_time_total for e in kernels)
        launches = sum(e.count for e in kernels)
        top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:args.top]
        print(f"\n== {mode}: {wall / nfe * 1e3:.2f} ms/step (under the profiler), {launches / nfe:.0f} kernels/step, "
              f"device {device_us / nfe / 1e3:.2f} ms/step")
        for e in top:
            print(f"  {e.self_device_time_total / nfe / 1e3:7.3f} ms/step  {e.count / nfe:6.1f}/step  {e.key[:110]}")
        host = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                      key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
        print("  host ops by self time (ms/step):")
        for e in host:
            print(f"  {e.self_cpu_time_total / nfe / 1e3:7.3f} ms/step  {e.count / nfe:6.1f}/step  {e.key[:110]}")
        report[mode] = {"ms_per_step_profiled": round(wall / nfe * 1e3, 3), "kernels_per_step": round(launches / nfe, 1),
                        "device_ms_per_step": round(device_us / nfe / 1e3, 3),
                        "top": [{"kernel": e.key[:160], "ms_per_step": round(e.self_device_time_total / nfe / 1e3, 4),
                                 "per_step": round(e.count / nfe, 2)} for e in top],
                        "host_top": [{"op": e.key[:160], "ms_per_step": round(e.self_cpu_time_total / nfe / 1e3, 4),
                                      "per_step": round(e.count / nfe, 2)} for e in host]}
    if "graph" in args.modes:   # Python-level: where the host spends a graph-mode step (waits on the device included)
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        out = llm.generate(prompts, sp)[0]
        torch.cuda.synchronize()
        pr.disable()
        text = io.StringIO()
        pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(args.top)
        print(f"\n== graph, cProfile over {out.metrics.nfe} steps (tottime)")
        print("\n".join(text.getvalue().splitlines()[-args.top - 3:]))
    print(json.dumps({"config": str(args.config_dir), "cache": args.cache, "batch": args.batch, **report}))


if __name__ == "__main__":
    main()

"""Where a graph-mode denoising step's wall time goes, without a profiler: the host's own timeline per step.

Wraps the runner's graph replay and the engine's status transfer with host timestamps (and CUDA events around
each replay) while `LLM.generate` decodes random prompts on a real-shape model (random weights), then reports
per step over the timed run (median and mean):

- wait:    host time blocked in the status transfer (the device still working on the step);
- prepare: host time from the transfer's return to the next replay call (emitting, planning, feeding inputs);
- launch:  host time inside the replay call (input copies and the graph launch);
- enqueue: host time from the replay's return to the next status transfer (sampling and commit kernels);
- graph:   device time of the replay (CUDA events), and the step's wall time.

The device idles for roughly `prepare` + part of `launch` a step: the status transfer waits for the device, and
nothing is queued behind it until the host has decided the next step.

    python benchmarks/host_gap.py --config-dir tests/data/checkpoints/SDAR-8B-Chat --cache block --batch 1 --gen 128 --block 4
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dllm import engine as engine_module  # noqa: E402
from dllm import runner as runner_module  # noqa: E402
from real_shape import dummy_llm, one_token_a_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-dir", default=str(REPO / "tests" / "data" / "checkpoints" / "SDAR-8B-Chat"))
    ap.add_argument("--cache", default="block")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--block", type=int, default=4)
    args = ap.parse_args()

    llm = dummy_llm(args.config_dir, device="cuda", dtype="bfloat16", cache=args.cache, strategy="reference")
    prompts, sp = one_token_a_step(llm, args.batch, args.prompt_len, args.gen, args.block)
    llm.generate(prompts, sp)   # graphs captured, kernels warm
    llm.generate(prompts, sp)

    marks: list[tuple[str, float]] = []
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    replay, fetch_all = runner_module._Graph.replay, engine_module.StatusRead.fetch_all

    def timed_replay(self, inputs):
        marks.append(("replay", time.perf_counter()))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = replay(self, inputs)
        end.record()
        events.append((start, end))
        marks.append(("replayed", time.perf_counter()))
        return out

    def timed_fetch(reads):
        marks.append(("fetch", time.perf_counter()))
        out = fetch_all(reads)
        marks.append(("fetched", time.perf_counter()))
        return out

    runner_module._Graph.replay = timed_replay
    engine_module.StatusRead.fetch_all = staticmethod(timed_fetch)
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = llm.generate(prompts, sp)[0]
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        runner_module._Graph.replay = replay
        engine_module.StatusRead.fetch_all = staticmethod(fetch_all)

    parts = {"wait": [], "prepare": [], "launch": [], "enqueue": []}
    last = {}
    for name, t in marks:
        if name == "replay" and "fetched" in last:
            parts["prepare"].append(t - last["fetched"])
        elif name == "replayed":
            parts["launch"].append(t - last["replay"])
        elif name == "fetch" and "replayed" in last:
            parts["enqueue"].append(t - last["replayed"])
        elif name == "fetched":
            parts["wait"].append(t - last["fetch"])
        last[name] = t
    nfe = out.metrics.nfe
    graph_ms = [s.elapsed_time(e) for s, e in events]
    row = {"config": pathlib.Path(args.config_dir).name, "cache": args.cache, "batch": args.batch, "gen": args.gen,
           "block": args.block, "nfe": nfe, "replays": len(events), "ms_per_step": round(wall / nfe * 1e3, 3),
           "graph_ms_median": round(statistics.median(graph_ms), 3) if graph_ms else None,
           "graph_ms_mean": round(statistics.mean(graph_ms), 3) if graph_ms else None}
    for name, values in parts.items():   # medians: a block's usual step; means: what the run's wall time adds up
        row[f"{name}_ms_median"] = round(statistics.median(values) * 1e3, 3) if values else None
        row[f"{name}_ms_mean"] = round(statistics.mean(values) * 1e3, 3) if values else None
    print(f"{row['config']} {args.cache} b{args.batch}: {row['ms_per_step']} ms/step over {nfe} steps "
          f"({len(events)} graph replays, device {row['graph_ms_median']} ms median, {row['graph_ms_mean']} mean); "
          "host per step (median / mean): " + ", ".join(f"{k} {row[f'{k}_ms_median']} / {row[f'{k}_ms_mean']} ms"
                                                        for k in parts))
    print(json.dumps(row))


if __name__ == "__main__":
    main()

"""Accuracy, NFE, token x layer K/V computations and throughput of every cache (and guided diffusion) on the zoo's
diffusion models, on held-out problems of the zoo tasks. Each setting is the same decoding with and without its
cache, so accuracy and compute can be read against the uncached row of the same strategy.

    python benchmarks/zoo_caches.py --models tiny-llada,tiny-dream --tasks arith,gsm-lite --problems 200

Prints the setting, a Markdown table, and a JSON last line.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dllm import LLM, SamplingParams  # noqa: E402
from dllm.eval.tasks import get_task  # noqa: E402
from dllm.eval.tasks.chat import to_messages  # noqa: E402

# (label, cache, strategy, cache_options, strategy_options, block_length or None for the default 32)
SETTINGS = [
    ("reference / none", "none", "reference", {}, {}, None),
    ("reference / dkv", "dkv", "reference", {}, {}, None),
    ("threshold / none", "none", "threshold", {}, {}, None),
    ("threshold / prefix", "prefix", "threshold", {}, {}, None),
    ("threshold / dual", "dual", "threshold", {}, {}, None),
    ("threshold / dkv", "dkv", "threshold", {}, {}, None),
    ("threshold / freecache", "freecache", "threshold", {}, {}, None),
    ("threshold / elastic", "elastic", "threshold", {}, {}, None),
    ("threshold / none, one block", "none", "threshold", {}, {}, "all"),
    ("threshold / elastic, one block", "elastic", "threshold", {}, {}, "all"),
    ("guided (tiny-ar) / none, one block", "none", "guided", {}, {"guide": "tiny-ar"}, "all"),
    ("guided (tiny-ar) / freecache, one block", "freecache", "guided", {}, {"guide": "tiny-ar"}, "all"),
]


def params_for(model: str, strategy: str, block, max_tokens: int) -> SamplingParams:
    extra = {}
    if strategy == "reference":
        extra["steps"] = max_tokens
        if model == "tiny-dream":
            extra["alg"] = "maskgit_plus"
    if strategy == "threshold":
        extra["threshold"] = 0.9
    return SamplingParams(max_tokens=max_tokens, block_length=max_tokens if block == "all" else 32, temperature=0,
                          **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-llada,tiny-dream")
    ap.add_argument("--tasks", default="arith,gsm-lite")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    hardware = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    print(f"setting: {args.problems} held-out problems a task, max_tokens {args.max_tokens}, greedy, block 32 unless "
          f"'one block'; device {device} ({hardware}); torch {torch.__version__}")
    rows = []
    for model in args.models.split(","):
        for label, cache, strategy, copts, sopts, block in SETTINGS:
            llm = LLM(model, cache=cache, strategy=strategy, cache_options=copts, strategy_options=sopts,
                      device=device, max_batch_size=args.problems)
            for task_name in args.tasks.split(","):
                task = get_task(task_name)
                problems = task.generate("test", args.problems)
                params = params_for(model, strategy, block, args.max_tokens)
                llm.chat([to_messages(problems[0])], params)  # warm-up
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                outs = llm.chat([to_messages(p) for p in problems], params)
                seconds = time.perf_counter() - start
                tokens = sum(o.metrics.num_tokens for o in outs)
                rows.append({
                    "model": model, "task": task_name, "setting": label,
                    "accuracy": sum(task.check(p, o.text) for p, o in zip(problems, outs)) / len(problems),
                    "nfe": sum(o.metrics.nfe for o in outs) / len(outs),
                    "kv_per_request": sum(o.metrics.kv_computations for o in outs) / len(outs),
                    "kv_fraction": sum(o.metrics.kv_fraction for o in outs) / len(outs),
                    "throughput": tokens / seconds})
            del llm
    base = {(r["model"], r["task"], r["setting"]): r for r in rows}
    print("| model | task | setting | accuracy | NFE | K/V computations per request (token x layer) | vs uncached | "
          "throughput (tok/s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        strategy_part, cache_part = r["setting"].split(" / ")
        one_block = ", one block" if "one block" in cache_part else ""
        ref = base.get((r["model"], r["task"], f"{strategy_part} / none{one_block}"))
        ratio = r["kv_per_request"] / ref["kv_per_request"] if ref else float("nan")
        print(f"| {r['model']} | {r['task']} | {r['setting']} | {100 * r['accuracy']:.1f}% | {r['nfe']:.1f} | "
              f"{r['kv_per_request']:,.0f} | {ratio:.2f} | {r['throughput']:.0f} |")
    print(json.dumps({"device": device, "hardware": hardware, "problems": args.problems, "rows": rows}))


if __name__ == "__main__":
    main()

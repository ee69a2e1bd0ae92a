"""S2D2 on tiny-sdar against SDAR's reference sampler (low_confidence_dynamic, threshold 0.85) and Fast-dLLM
threshold decoding (0.9) at the same block size, on the zoo tasks, through `dllm bench`.

Per task and block size (4: Config-A's, 16: Config-B's) one `dllm bench` run sweeps the baselines, and one per S2D2
setting: the preset as published (cache_ver and draft_ver on) and the preset with both off (tiny-sdar was trained
from scratch at block size 4, never causally). Every run uses the exact block cache, greedy decoding and batch 16.

Prints the setting, one line per row, and as the last line one JSON object: per task and block size the rows
(accuracy, NFE, tokens per forward, tokens/s) and the forward ratio reference NFE / S2D2 NFE with the accuracy gap.

    python benchmarks/s2d2_zoo.py --limit 50 --output runs/bench-s2d2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TASKS = ("arith", "gsm-lite", "code-lite")
OFF = ["cache_ver=false", "draft_ver=false"]
S2D2 = {4: {"config-a": ["preset=config-a"], "config-a-nover": ["preset=config-a", *OFF]},
        16: {"config-b": ["preset=config-b"], "config-b-nover": ["preset=config-b", *OFF]}}


def bench(out: Path, task: str, limit: int, block: int, extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "dllm.cli", "bench", "--task", task, "--limit", str(limit), "--model", "tiny-sdar",
           "--device", "cpu", "--cache", "block", "--batch-size", "16", "--temperature", "0", "--no-progress",
           "--output", str(out), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    doc = json.loads((out / "bench.json").read_text())
    return [dict(setting=r["setting"], accuracy=r["metrics"]["accuracy"], nfe=r["metrics"]["nfe"],
                 tokens_per_forward=r["metrics"]["tokens_per_forward"],
                 tokens_per_s=r["metrics"]["tokens_per_second"], throughput=r["metrics"]["throughput"])
            for r in doc["rows"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--output", default="runs/bench-s2d2")
    args = ap.parse_args()
    print(f"setting: tiny-sdar, tasks {', '.join(TASKS)}, first {args.limit} test problems, CPU, block cache, greedy, "
          "batch 16; reference = SDAR low_confidence_dynamic 0.85, threshold = 0.9", flush=True)
    result = {}
    for task in TASKS:
        for block, presets in S2D2.items():
            base = Path(args.output) / task / f"b{block}"
            rows = bench(base / "baselines", task, args.limit, block,
                         ["--remasking", "low_confidence_dynamic", "--grid", "strategies=reference,threshold",
                          f"block-lengths={block}"])
            rows = [r for r in rows if "/none" not in r["setting"]]
            for name, options in presets.items():
                flags = [x for o in options for x in ("--strategy-option", o)]
                got = bench(base / name, task, args.limit, block,
                            ["--strategy", "s2d2", *flags, "--grid", f"block-lengths={block}"])
                rows += [dict(r, setting=name) for r in got if r["setting"].startswith("s2d2")]
            ref = next(r for r in rows if r["setting"].startswith("reference"))
            for r in rows:
                r["forward_ratio_vs_reference"] = ref["nfe"] / r["nfe"] if r["nfe"] else None
                r["accuracy_gap_points"] = 100 * (ref["accuracy"] - r["accuracy"])
                print(task, block, json.dumps(r), flush=True)
            result[f"{task}/b{block}"] = rows
    print(json.dumps(result))


if __name__ == "__main__":
    main()

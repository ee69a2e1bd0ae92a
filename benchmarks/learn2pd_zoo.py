"""Learn2PD on the zoo: for one model, every zoo task, `dllm bench` rows for the reference sampler, Fast-dLLM threshold
0.9 and learn2pd (the shipped filter, threshold 0.96) with and without End-of-Text Prediction, with no cache and with
the dual cache. Three `dllm bench` calls per task into one run directory (a re-run resumes):
  1. strategies=reference,threshold,learn2pd caches=none      (reference/none is the baseline of the speed-ups)
  2. strategies=learn2pd caches=dual
  3. strategies=learn2pd caches=none,dual --strategy-option eotp=false   (its own directory: same setting names)
Prints the setting, one line per row, and the rows as a JSON last line.

    python benchmarks/learn2pd_zoo.py --model tiny-llada --limit 20 --out runs/l2p
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

TASKS = ("arith", "gsm-lite", "code-lite")
CALLS = [(["--grid", "strategies=reference,threshold,learn2pd", "caches=none"], "eotp", ""),
         (["--grid", "strategies=learn2pd", "caches=dual"], "eotp", ""),
         (["--strategy-option", "eotp=false", "--grid", "strategies=learn2pd", "caches=none,dual"], "no eotp",
          "-no-eotp")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="runs/learn2pd")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    args = ap.parse_args()
    print(f"setting: model {args.model}, tasks {args.tasks}, first {args.limit} test problems, max_tokens "
          f"{args.max_tokens}, blocks of 32, greedy, batch {args.limit}, CPU", flush=True)
    rows = []
    for task in args.tasks:
        for extra, label, suffix in CALLS:
            out = pathlib.Path(args.out) / f"{args.model}-{task}{suffix}"
            cmd = ["dllm", "bench", "--model", args.model, "--task", task, "--limit", str(args.limit),
                   "--batch-size", str(args.limit), "--max-tokens", str(args.max_tokens), "--block-length", "32", "--no-progress",
                   "--output", str(out), *extra]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
            bench = json.loads((out / "bench.json").read_text())
            for r in bench["rows"]:
                m = r["metrics"]
                row = {"model": args.model, "task": task, "setting": r["setting"] if r["setting"].startswith(
                    ("reference", "threshold")) else f"{r['setting']} {label}", "accuracy": m.get("accuracy"),
                    "nfe": m["nfe"], "tokens_per_forward": m["tokens_per_forward"], "throughput": m["throughput"],
                    "tokens_per_s": m["tokens_per_second"], "problems": m["num_docs"]}
                if row not in rows and not any(x["task"] == task and x["setting"] == row["setting"] for x in rows):
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(json.dumps({"model": args.model, "limit": args.limit, "rows": rows}))


if __name__ == "__main__":
    main()

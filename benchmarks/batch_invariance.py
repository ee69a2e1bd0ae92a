"""Batch invariance at temperature 0: the fraction of outputs identical to the same request decoded alone.

For each bundled zoo model and cache, greedy, the zoo tasks' first `--limit` test problems a task (mixed lengths):
- `together`: all requests in one call (one batch, padded to its bucket);
- `streamed`: the same requests through `--slots` slots of the step scheduler, so rows join as others leave and
  every row shares its steps with a changing set of neighbours;
against each request decoded alone (batch 1). A row counts as identical when its token ids are equal; for the
others the first position that differs is reported. In float32 the runtime is batch-invariant by design (the CPU
tests assert it); in bfloat16 on a GPU a matmul's kernel choice (tile shape, split-K) depends on the number of rows
fed, so logits of one row can move by a rounding step when its neighbours change, and a greedy argmax that is
within that step flips.

    python benchmarks/batch_invariance.py --device cuda --dtype bfloat16 --limit 12 --slots 8

Prints a table, then one JSON object as the last line (also $OUT/batch_invariance.json when OUT is set).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dllm import LLM, SamplingParams  # noqa: E402
from dllm.eval.tasks import get_task  # noqa: E402
from dllm.eval.tasks.chat import to_messages  # noqa: E402

SETTINGS = [("tiny-llada", "none", "threshold"), ("tiny-llada", "dual", "threshold"),
            ("tiny-llada", "prefix", "threshold"), ("tiny-dream", "dual", "threshold"),
            ("tiny-sdar", "block", "threshold"), ("tiny-tidar", "auto", "tidar")]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--limit", type=int, default=12, help="test problems a task (three tasks)")
    ap.add_argument("--slots", type=int, default=8, help="scheduler slots for the streamed run")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args(argv)
    messages = [to_messages(p) for task in ("arith", "gsm-lite", "code-lite")
                for p in get_task(task).generate("test", args.limit)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    print(f"setting: {len(messages)} requests (zoo tasks, first {args.limit} a task), greedy, max_tokens "
          f"{args.max_tokens}, {args.device} {args.dtype}, streamed through {args.slots} slots, "
          f"{'eager' if args.enforce_eager else 'graphs where the device has them'}")
    rows = []
    for model, cache, strategy in SETTINGS:
        common = dict(cache=cache, strategy=strategy, device=args.device, dtype=args.dtype,
                      enforce_eager=args.enforce_eager)
        llm = LLM(model, **common)
        alone = [llm.chat([m], params)[0].token_ids for m in messages]
        together = [o.token_ids for o in llm.chat(messages, params)]
        streamed = [o.token_ids for o in LLM(model, max_batch_size=args.slots, **common).chat(messages, params)]
        row = {"model": model, "cache": cache, "strategy": strategy, "requests": len(messages)}
        for name, got in (("together", together), ("streamed", streamed)):
            same = [g == a for g, a in zip(got, alone)]
            row[f"{name}_identical"] = sum(same) / len(same)
            row[f"{name}_first_differences"] = [first_difference(g, a) for g, a, s in zip(got, alone, same) if not s]
        rows.append(row)
        print(f"{model:11s} {cache:7s} {strategy:9s} together {row['together_identical']:6.1%}  "
              f"streamed {row['streamed_identical']:6.1%}  first differences {row['together_first_differences']} / "
              f"{row['streamed_first_differences']}", flush=True)
    result = {"benchmark": "batch_invariance", "device": args.device, "dtype": args.dtype, "slots": args.slots,
              "max_tokens": args.max_tokens, "eager": args.enforce_eager, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
              "rows": rows}
    line = json.dumps(result)
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "batch_invariance.json").write_text(line + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Saber against the reference sampler and threshold 0.9 at the same block length, through `dllm bench`, on the
# bundled tiny-llada and tiny-dream, tasks code-lite and arith (CPU). Then saber at the older published version
# (mu = 8, LLaDA; Dream's own constant is 8 already) in a copy of each bench directory, so that the baseline and
# the other rows are reused (a bench resumes like a run) and only the saber rows are decoded again.
# Usage: benchmarks/saber_cpu.sh [LIMIT] [OUT]   (defaults: 32 problems, benchmarks/results/saber-cpu); max_tokens 64
# (blocks of 32 and one block of 64), greedy, the zoo models in float32.
set -euo pipefail
LIMIT=${1:-32}
OUT=${2:-benchmarks/results/saber-cpu}
mkdir -p "$OUT"
GRID="strategies=reference,threshold,saber caches=none thresholds=0.9 block-lengths=32,64"
echo "setting: limit=$LIMIT batch=$LIMIT device=cpu max_tokens=64 temperature=0; grid $GRID; saber mu=2 (default) and mu=8 (LLaDA)"
for model in tiny-llada tiny-dream; do
  for task in code-lite arith; do
    dir="$OUT/$model-$task"
    dllm bench --model "$model" --task "$task" --limit "$LIMIT" --batch-size "$LIMIT" --device cpu --no-progress \
      --max-tokens 64 --temperature 0 --output "$dir" --grid $GRID \
      | tail -n 1 > "$dir.json"
    if [ "$model" = tiny-llada ]; then
      old="$OUT/$model-$task-mu8"
      mkdir -p "$old"
      for sub in "$dir"/*/; do
        case "$(basename "$sub")" in saber*) ;; *) cp -r "$sub" "$old/" ;; esac
      done
      dllm bench --model "$model" --task "$task" --limit "$LIMIT" --batch-size "$LIMIT" --device cpu --no-progress \
        --max-tokens 64 --temperature 0 --output "$old" --strategy-option mu=8 --grid $GRID \
        | tail -n 1 > "$old.json"
    fi
  done
done
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {}
keys = ("accuracy", "nfe", "tokens_per_forward", "tokens_per_second", "throughput", "remasked", "tokens")
for f in sorted(out.glob("*/bench.json")):
    bench = json.loads(f.read_text())
    rows[f.parent.name] = {r["setting"]: {k: r["metrics"].get(k) for k in keys} for r in bench["rows"]}
print(json.dumps({"machine": "2-core CPU, no GPU", "date": "2026-12-02", "results": rows}))
PY

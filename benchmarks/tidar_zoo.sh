#!/usr/bin/env bash
# TiDAR on the zoo: tiny-tidar decoded by TiDAR (`tidar`) and by its own AR half (`ar`), tiny-ar (its weights in a
# TiDAR-layout copy, decoded by `ar`: the same runtime, loop and exact cache, so tokens/s compare), and the
# diffusion models' Fast-dLLM threshold decoding (tiny-sdar, tiny-llada; `dllm bench` adds their reference rows).
# Greedy, the tasks' own max_tokens, every zoo task, through `dllm bench`; prints one line per row, then the rows
# as a JSON last line (also $OUT/tidar_zoo.json when OUT is set).
#
#   bash benchmarks/tidar_zoo.sh                       # 200 problems a task, batch 200, auto device (GPU if any)
#   LIMIT=8 BATCH=8 DEVICE=cpu bash benchmarks/tidar_zoo.sh
# Env: TIDAR (default dllm/zoo/models/tiny-tidar), LIMIT, BATCH, DEVICE, RUNS (bench directories, default
# runs/tidar-zoo), TASKS (default "arith gsm-lite code-lite"), DRAFT (draft_length, default the checkpoint's).
set -euo pipefail
cd "$(dirname "$0")/.."
TIDAR=${TIDAR:-dllm/zoo/models/tiny-tidar}
LIMIT=${LIMIT:-200}
BATCH=${BATCH:-$LIMIT}
DEVICE=${DEVICE:-auto}
RUNS=${RUNS:-runs/tidar-zoo}
TASKS=${TASKS:-"arith gsm-lite code-lite"}
DRAFT_OPT=()
if [ -n "${DRAFT:-}" ]; then DRAFT_OPT=(--strategy-option "draft_length=$DRAFT"); fi
[ -f "$TIDAR/config.json" ] || { echo "no TiDAR checkpoint at $TIDAR (train it: python -m dllm.train zoo --families tidar)"; exit 1; }

# tiny-ar's weights under a TiDAR config (model_type tidar; `ar` never feeds a MASK token)
AR_COPY="$RUNS/tiny-ar-as-tidar"
mkdir -p "$AR_COPY"
cp dllm/zoo/models/tiny-ar/{model.safetensors,tokenizer.json,tokenizer_config.json,special_tokens_map.json,generation_config.json} "$AR_COPY/"
python - "$AR_COPY" "$TIDAR" <<'PY'
import json, pathlib, sys
out, tidar = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
cfg = json.loads(pathlib.Path("dllm/zoo/models/tiny-ar/config.json").read_text())
t = json.loads((tidar / "config.json").read_text())
cfg.update(architectures=["TiDARForCausalLM"], model_type="tidar", attention_bias=True,
           mask_token_id=t["mask_token_id"], draft_length=t["draft_length"], block_size=t["block_size"])
(out / "config.json").write_text(json.dumps(cfg, indent=1))
PY

echo "setting: $TIDAR vs its AR decoding, tiny-ar, tiny-sdar and tiny-llada threshold 0.9; tasks $TASKS; first $LIMIT test problems, batch $BATCH, greedy, device $DEVICE"
common=(--limit "$LIMIT" --batch-size "$BATCH" --device "$DEVICE" --temperature 0 --no-progress --overwrite)
for task in $TASKS; do
  dllm bench --model "$TIDAR" --task "$task" "${common[@]}" "${DRAFT_OPT[@]}" --grid strategies=tidar,ar -o "$RUNS/tiny-tidar-$task" > /dev/null
  dllm bench --model "$AR_COPY" --task "$task" "${common[@]}" --grid strategies=ar -o "$RUNS/tiny-ar-$task" > /dev/null
  dllm bench --model tiny-sdar --task "$task" "${common[@]}" --grid strategies=threshold thresholds=0.9 -o "$RUNS/tiny-sdar-$task" > /dev/null
  dllm bench --model tiny-llada --task "$task" "${common[@]}" --grid strategies=threshold thresholds=0.9 -o "$RUNS/tiny-llada-$task" > /dev/null
done

python - "$RUNS" "$TASKS" <<'PY'
import json, os, pathlib, sys
runs, tasks = pathlib.Path(sys.argv[1]), sys.argv[2].split()
rows = []
for task in tasks:
    for model in ("tiny-tidar", "tiny-ar", "tiny-sdar", "tiny-llada"):
        bench = json.loads((runs / f"{model}-{task}" / "bench.json").read_text())
        for r in bench["rows"]:
            m = r["metrics"]
            if not r["setting"].startswith("ar/auto"):   # = ar/none (the auto cache of `ar` is none)
                rows.append({"model": model, "task": task, "setting": r["setting"], "accuracy": m.get("accuracy"),
                             "tokens_per_forward": m.get("tokens_per_forward"), "throughput": m.get("throughput"),
                             "tokens_per_s_per_request": m.get("tokens_per_second")})
print(f"{'task':>10} {'model':>11} {'setting':>26} {'accuracy':>8} {'TPF':>6} {'tok/s':>9}")
for r in rows:
    acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
    print(f"{r['task']:>10} {r['model']:>11} {r['setting']:>26} {acc:>8} {r['tokens_per_forward'] or 0:>6.2f} "
          f"{r['throughput'] or 0:>9.1f}")
result = {"benchmark": "tidar_zoo", "rows": rows}
if os.environ.get("OUT"):
    (pathlib.Path(os.environ["OUT"]) / "tidar_zoo.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result))
PY

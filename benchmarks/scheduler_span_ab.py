"""The merged forward's row bucket, finer (`span_bucket`: 12, 24, 48 between the powers of two) against powers of
two, in one process at LLaDA-8B's shape (random weights): the same Poisson arrivals (2 requests/s, 20 requests)
through `benchmarks/scheduler_steps.py`'s trial, one warm-up trial of each (its merged shapes' graphs captured),
then the two alternated twice. One JSON line a trial, then one JSON object.

    python3 benchmarks/scheduler_span_ab.py          # from the repository root, on a GPU
"""
import argparse, json, pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dllm.runner as runner_module
from real_shape import dummy_llm
import scheduler_steps as ss

args = argparse.Namespace(config_dir="tests/data/checkpoints/LLaDA-8B-Instruct", device="cuda", dtype="bfloat16",
                          rate=2.0, requests=20, max_tokens=256, slots=32, seed=0)
llm = dummy_llm(args.config_dir, dtype="bfloat16", device="cuda", cache="dual", strategy="reference")
rec = ss.Recorder(llm.engine.runner, "cuda")
finer, pow2 = runner_module.span_bucket, runner_module.batch_bucket
rows = []
for label, bucket in (("warm finer", finer), ("warm pow2", pow2), ("finer", finer), ("pow2", pow2),
                      ("finer", finer), ("pow2", pow2)):
    runner_module.span_bucket = bucket
    r = ss.trial(llm, rec, args, label, 2.0, 20)
    rows.append(r)
print(json.dumps({"benchmark": "span_ab", "rows": rows}))

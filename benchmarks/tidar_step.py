"""Time of one TiDAR step against one AR step at an 8B causal shape (random bf16 weights), on one GPU.

The model: a Qwen3-8B-like causal transformer in the TiDAR layout (config.json written here: hidden 4096, 36 layers,
32 heads, 8 K/V heads, head_dim 128, FFN 12288, vocab 151936), `load_format="dummy"` (random weights, no tokenizer).
For each batch size and draft length k, a TiDAR run (`decoding/tidar_run.py`) prefills a 256-token random prompt,
then its decoding step is timed: one forward over [pending token + k drafts] (causal, over the cached prefix)
+ (k+1) pre-draft branches of k+1 MASK tokens, i.e. (k+1)(k+2) fed tokens, plus verification, commit and the next
drafts (the whole loop iteration, as decoding runs it). The AR step is the same loop with no drafts (strategy `ar`):
one token over the cached prefix. Random weights accept ~no draft, so the prefix grows by ~1 token a step in both.

Mode: CUDA graphs when the runner captures the step's shape (it does: a step's shapes are fixed per (batch, k)),
`--eager` for the same kernels launched one by one; the row's `graphs` column says how many the runner captured.
On CPU (`--tiny`: a 2-layer toy config, k = 2, 4) it is a smoke test only.

    python benchmarks/tidar_step.py                      # H200: k = 4, 8, 16 at batch 1 and 8
    python benchmarks/tidar_step.py --tiny               # CPU smoke test

Prints a table, then one JSON object as the last line (also written to $OUT/tidar_step.json when OUT is set).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dllm import LLM, SamplingParams  # noqa: E402
from dllm.engine import Request  # noqa: E402

BIG = {"hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
       "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936, "max_position_embeddings": 40960,
       "rope_theta": 1000000.0}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "vocab_size": 1024, "max_position_embeddings": 4096, "rope_theta": 10000.0}


def write_config(root: pathlib.Path, dims: dict, draft_length: int) -> pathlib.Path:
    cfg = {"architectures": ["TiDARForCausalLM"], "model_type": "tidar", "mask_token_id": 1, "attention_bias": False,
           "draft_length": draft_length, "block_size": draft_length + 1, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "tie_word_embeddings": False, "bos_token_id": 2, "eos_token_id": 0, "pad_token_id": 0,
           "torch_dtype": "bfloat16", **dims}
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    return root


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(llm: LLM, batch: int, prompt_len: int, warmup: int, repeats: int, device: str) -> float:
    """Median ms of one decoding step (after the prefill and `warmup` steps, graphs captured by then)."""
    engine = llm.engine
    vocab = llm.loaded.arch.vocab_size
    g = torch.Generator().manual_seed(0)
    k = engine.strategy_state["draft_length"]
    # room for every step to commit k + 1 tokens (random weights accept ~none, but the K/V width must hold them)
    params = engine.resolve(SamplingParams(max_tokens=(warmup + repeats + 2) * (k + 1), temperature=0, ignore_eos=True))
    requests = [Request(f"r{i}", torch.randint(5, vocab, (prompt_len,), generator=g).tolist(), params)
                for i in range(batch)]
    run = engine.open_run(requests, stream=False)
    times = []
    with torch.no_grad():
        run._prefill()
        for i in range(warmup + repeats):
            sync(device)
            t = time.perf_counter()
            run._step()
            sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
    run.close()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="toy config on CPU (smoke test)")
    ap.add_argument("--draft-lengths", type=int, nargs="+", default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (enforce_eager)")
    args = ap.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dims = TINY if args.tiny else BIG
    ks = args.draft_lengths or ([2, 4] if args.tiny else [4, 8, 16])
    batches = args.batch_sizes or ([1, 2] if args.tiny else [1, 8])
    mode = "eager" if args.eager or device == "cpu" else "graph"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"setting: {'tiny toy' if args.tiny else 'Qwen3-8B-like'} causal shape {dims}, random "
          f"{'bf16' if device == 'cuda' else 'fp32'} weights, prompt {args.prompt_len}, median of {args.repeats} steps "
          f"after {args.warmup}, greedy, {mode} on {name}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(pathlib.Path(tmp) / "tidar", dims, max(ks))
        dtype = "bfloat16" if device == "cuda" else "float32"
        for strategy, k_list in (("ar", [0]), ("tidar", ks)):
            for k in k_list:
                opts = {"draft_length": k} if strategy == "tidar" else {}
                llm = LLM(str(path), strategy=strategy, strategy_options=opts, load_format="dummy", dtype=dtype,
                          device=device, skip_tokenizer_init=True, enforce_eager=mode == "eager", max_batch_size=64)
                for b in batches:
                    ms = time_steps(llm, b, args.prompt_len, args.warmup, args.repeats, device)
                    fed = (k + 1) * (k + 2) if k else 1
                    rows.append({"strategy": strategy, "draft_length": k, "batch": b, "fed_tokens": fed,
                                 "step_ms": round(ms, 3), "mode": mode,
                                 "graphs": llm.engine.runner.stats()["graphs"]})
                del llm
                if device == "cuda":
                    torch.cuda.empty_cache()
    ar = {r["batch"]: r["step_ms"] for r in rows if r["strategy"] == "ar"}
    for r in rows:
        # = the tokens a TiDAR step must commit on average to match AR's tokens/s (AR: 1 token a step)
        r["vs_ar"] = round(r["step_ms"] / ar[r["batch"]], 3)
    print(f"{'strategy':>8} {'k':>3} {'batch':>5} {'fed':>5} {'step ms':>9} {'x AR step':>9} {'graphs':>6}")
    for r in rows:
        print(f"{r['strategy']:>8} {r['draft_length']:>3} {r['batch']:>5} {r['fed_tokens']:>5} {r['step_ms']:>9.3f} "
              f"{r['vs_ar']:>9.3f} {r['graphs']:>6}")
    result = {"benchmark": "tidar_step", "device": name, "mode": mode, "prompt_len": args.prompt_len,
              "config": dims, "rows": rows}
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(os.environ["OUT"]) / "tidar_step.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

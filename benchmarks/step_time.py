"""Denoising step time of real-shape models (random weights) per family, cache, batch size and runner mode.

Builds each model from a checkpoint directory's config.json (LLaDA-8B-Instruct, Dream-v0-Instruct-7B,
SDAR-8B-Chat; `--config-root` holds one directory per model) with `load_format="dummy"`, decodes random prompts
through the public API with the reference strategy at one token a step (random weights are never confident, so
every strategy would commit one token a step), `ignore_eos`, and reports per (family, cache, batch, mode):

- ms per denoising step = generate() wall time / NFE (block starts, sampling and the engine loop included);
- the two forwards of a cached block timed alone (block start: the policy's step-0 plan; in block: its step-1
  plan), and the step time the engine would have with no overhead beyond them;
- step / floor, floor = bytes of weights / measured device copy bandwidth (read + write counted);
- tokens/s (aggregate and per request), peak GPU memory, graphs captured and their capture time.

Modes: `graph` (CUDA graphs, the default runner) and `eager` (`enforce_eager=True`, the same kernels launched
one by one). Expensive settings (the no-cache step and big batches) decode a shorter answer on the same canvas
length (prompt + gen kept; the row's `gen` says what ran), which leaves the per-step cost of none/dual/block
unchanged (one full forward a step, or one block start per block).

    python benchmarks/step_time.py --config-root tests/data/checkpoints --batch-sizes 1 8 32 64

Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dllm import LLM, SamplingParams  # noqa: E402
from dllm.cache import CACHES, make_cache  # noqa: E402
from dllm.canvas import Canvas  # noqa: E402
from dllm.engine import Engine  # noqa: E402

MODELS = {"llada": "LLaDA-8B-Instruct", "dream": "Dream-v0-Instruct-7B", "sdar": "SDAR-8B-Chat"}
# (gen length, block length) of the setting per family
SHAPES = {"llada": (256, 32), "dream": (128, 32), "sdar": (128, 4)}
BIG_BATCH = 32   # from here on, short runs (see the module docstring)


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(size_bytes=2 << 30, repeats=20) -> float:
    """Bytes moved per second by a device-to-device copy (read + write counted)."""
    if DEVICE != "cuda":
        size_bytes, repeats = 1 << 26, 3
    src = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync()
    return 2 * size_bytes * repeats / (time.perf_counter() - t)


def caches_for(family: str, wanted: list[str] | None) -> list[str]:
    attention = "block_causal" if family == "sdar" else "full"
    names = [n for n, cls in CACHES.items() if attention in cls.attentions]
    return [n for n in names if wanted is None or n in wanted]


def time_forward(engine: Engine, prompt_len: int, batch: int, gen: int, block: int, step: int,
                 repeats: int) -> float:
    """Median ms of one runner forward as the engine's cache policy plans the first decoded block at block step
    `step` (the block-causal family: the second decoded block, so the block start also stores the block before)."""
    loaded, runner = engine.loaded, engine.runner
    canvas = Canvas([[2] * prompt_len] * batch, gen, block, loaded.spec, engine.device)
    policy = make_cache(engine.cache_name, engine.cache_options)
    runner.prepare(batch, canvas.length + 1)
    policy.kv_source = runner.kv_buffers
    policy.allocate(batch, canvas.length, loaded.arch, loaded.spec, engine.dtype, engine.device)
    policy.attach(canvas)
    first = 1 if canvas.block_causal else 0
    start, end = canvas.block(first)
    if canvas.block_causal:
        policy.stored_until = start - block
    if step > 0:   # the block start comes first: a policy keeps what it learnt there (dual: the block's mask)
        policy.plan(start, end, 0, canvas.attn_mask)
    plan = policy.plan(start, end, step, canvas.attn_mask)
    ids, pos = canvas.tokens[:, plan.start:plan.end], canvas.positions[:, plan.start:plan.end]
    shift = int(loaded.spec.shift_logits)
    index = (torch.arange(start - shift, end - shift, device=DEVICE).clamp(min=plan.start) - plan.start)
    index = index.expand(batch, -1)
    times = []
    for i in range(repeats + 2):
        sync()
        t = time.perf_counter()
        runner.forward(ids, pos, plan, index)
        sync()
        if i >= 2:   # the first two calls run eagerly / capture
            times.append(time.perf_counter() - t)
    runner.release(policy.buffers)
    return sorted(times)[len(times) // 2] * 1e3


def run_setting(llm: LLM, family: str, cache: str, batch: int, mode: str, args, floor_ms: float) -> dict:
    gen, block = SHAPES[family]
    prompt_len = args.prompt_len
    length = prompt_len + gen
    short = cache == "none" and batch > 1 or batch >= BIG_BATCH
    run_gen = min(gen, (2 if cache != "none" else 1) * max(block, 32)) if short else gen
    run_prompt = length - run_gen                              # same canvas length
    engine = Engine(llm.loaded, cache=cache, strategy="reference", enforce_eager=(mode == "eager"))
    llm.engine = engine
    g = torch.Generator().manual_seed(batch)
    vocab = llm.loaded.arch.vocab_size
    prompts = [torch.randint(2, vocab - 2, (run_prompt,), generator=g).tolist() for _ in range(batch)]
    # one token a step; Dream's maskgit_plus rule (its default `origin` commits a random count per step)
    extra = {"alg": "maskgit_plus"} if family == "dream" else {}
    sp = SamplingParams(max_tokens=run_gen, block_length=block, steps=run_gen if family != "sdar" else block,
                        ignore_eos=True, temperature=0, **extra)
    if args.warm == "full":   # the timed call once first: every fed width's graph captured (a server's steady state)
        llm.generate(prompts, sp)
    else:   # on the same canvas length, one block: kernels compiled, the block's graphs captured
        warm = [q[:length - block] if len(q) >= length - block else q + q[:length - block - len(q)] for q in prompts]
        llm.generate(warm, SamplingParams(max_tokens=block, block_length=block, steps=sp.steps * block // run_gen or 1,
                                          ignore_eos=True, temperature=0, **extra))
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    sync()
    wall = time.perf_counter() - t
    nfe = outs[0].metrics.nfe
    ms = wall / nfe * 1e3
    full_ms = in_ms = float("nan")
    if cache in ("prefix", "dual", "block") or (cache == "none" and batch < BIG_BATCH):
        full_ms = time_forward(engine, run_prompt, batch, run_gen, block, 0, 5)
        in_ms = time_forward(engine, run_prompt, batch, run_gen, block, 1, 10) if cache != "none" else full_ms
    model_ms = (full_ms + (block - 1) * in_ms) / block         # one token a step: `block` steps a block
    stats = engine.runner.stats()
    return {"family": family, "cache": cache, "batch": batch, "mode": mode, "prompt": run_prompt, "gen": run_gen,
            "block": block, "nfe": nfe, "wall_s": round(wall, 3), "ms_per_step": round(ms, 2),
            "block_start_forward_ms": _r(full_ms), "in_block_forward_ms": _r(in_ms),
            "forwards_only_ms_per_step": _r(model_ms),
            "engine_overhead": _r(ms / model_ms - 1 if model_ms == model_ms else float("nan"), 3),
            "floor_ms": round(floor_ms, 2), "step_over_floor": round(ms / floor_ms, 2),
            "tokens_per_s": round(batch * run_gen / wall, 1), "tokens_per_s_per_request": round(run_gen / wall, 1),
            "peak_gpu_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if DEVICE == "cuda" else None,
            "graphs": stats["graphs"], "capture_s": stats["capture_seconds"],
            "kv_pool_GB": round(stats["kv_pool_bytes"] / 1e9, 2), "graph_pool_GB": round(stats["graph_pool_bytes"] / 1e9, 2)}


def _r(x: float, digits: int = 2):
    return None if x != x else round(x, digits)


def modes_for(cache: str, batch: int, wanted: list[str]) -> list[str]:
    if cache == "elastic":                      # per-layer hooks: always eager
        return ["eager"] if "eager" in wanted else []
    if cache == "none" and batch >= BIG_BATCH:  # compute-bound: graphs change nothing measurable
        return ["graph"] if "graph" in wanted else wanted[:1]
    return wanted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-root", default=str(REPO / "tests" / "data" / "checkpoints"),
                    help="directory with one sub-directory per model holding its real config.json")
    ap.add_argument("--families", nargs="+", default=list(MODELS))
    ap.add_argument("--caches", nargs="+", default=None, help="default: every cache the family serves")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"])
    ap.add_argument("--max-batch-for", nargs="*", default=["prefix=8", "freecache=8", "dkv=8", "elastic=8"],
                    help="cache=N: skip batches above N for the costly caches (their step depends on the state)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda", help="cuda (what the figures mean); cpu only to smoke-test the script")
    ap.add_argument("--output", default=None, help="also write the JSON result here")
    ap.add_argument("--masked-gqa", choices=("grouped", "expand"), default=None,
                    help="how masked attention reads grouped K/V heads (dllm.attention.MASKED_GQA)")
    ap.add_argument("--warm", choices=("block", "full"), default="block",
                    help="warm-up before the timed call: one block of the canvas (default), or the timed call itself "
                         "(every fed width's graph captured first, as in a server that has run a while)")
    args = ap.parse_args()
    if args.masked_gqa:
        import dllm.attention
        dllm.attention.MASKED_GQA = args.masked_gqa
    limits = {k: int(v) for k, v in (item.split("=") for item in args.max_batch_for)}
    global DEVICE
    DEVICE = args.device

    bandwidth = copy_bandwidth()
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"device {gpu}, torch {torch.__version__}, dtype {args.dtype}, prompt {args.prompt_len}, one token a step, "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    results, models = [], {}
    for family in args.families:
        work = pathlib.Path(tempfile.mkdtemp())
        for name in ("config.json", "generation_config.json"):
            src = pathlib.Path(args.config_root) / MODELS[family] / name
            if src.is_file():
                shutil.copy(src, work / name)
        llm = LLM(str(work), dtype=args.dtype, device=DEVICE, load_format="dummy", skip_tokenizer_init=True)
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.loaded.model.parameters())
        floor_ms = weight_bytes / bandwidth * 1e3
        models[family] = {"config": MODELS[family], "weight_bytes": weight_bytes, "floor_ms": round(floor_ms, 3),
                          "gen": SHAPES[family][0], "block": SHAPES[family][1]}
        for cache in caches_for(family, args.caches):
            for batch in args.batch_sizes:
                if batch > limits.get(cache, batch):
                    continue
                for mode in modes_for(cache, batch, args.modes):
                    try:
                        row = run_setting(llm, family, cache, batch, mode, args, floor_ms)
                    except Exception as exc:  # report and go on: one failing setting must not cost the run
                        print(f"{family} {cache} b{batch} {mode}: FAILED {type(exc).__name__}: {exc}", flush=True)
                        results.append({"family": family, "cache": cache, "batch": batch, "mode": mode,
                                        "error": f"{type(exc).__name__}: {exc}"[:300]})
                        continue
                    results.append(row)
                    print(f"{family:5s} {cache:9s} b{batch:<3d} {mode:5s} {row['ms_per_step']:8.2f} ms/step  "
                          f"(start {row['block_start_forward_ms']}, in-block {row['in_block_forward_ms']}, "
                          f"overhead {row['engine_overhead']})  floor {floor_ms:.2f}  x{row['step_over_floor']}  "
                          f"{row['tokens_per_s']:9.1f} tok/s  peak {row['peak_gpu_GB']} GB  "
                          f"graphs {row['graphs']} ({row['capture_s']} s)", flush=True)
        del llm
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    import dllm.attention
    summary = {"device": gpu, "torch": torch.__version__, "dtype": args.dtype, "prompt_len": args.prompt_len,
               "warm": args.warm,
               "masked_gqa": dllm.attention.MASKED_GQA,
               "copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "models": models, "results": results}
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

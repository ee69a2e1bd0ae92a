"""The `dllm` command: `dllm generate` (one-shot, prompts from arguments, a file or stdin), `dllm chat`
(interactive; text streams as blocks become final), `dllm serve`, `dllm eval` and `dllm bench` (the evaluation
harness in `eval/`), `dllm train-filter` (a Learn2PD filter for a model). Every decoding and cache option of the API is exposed.
User errors print one line, `error: ...`, and exit with status 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from dllm.cache import CACHES
from dllm.decoding import STRATEGIES
from dllm.defaults import AUTO, describe
from dllm.errors import DllmError
from dllm.sampling_params import DREAM_ALGS, REMASKING, SamplingParams
from dllm.zoo import DEFAULT_MODEL


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see '{self.prog} --help'\n")


MODEL_HELP = ("checkpoint directory in the Hugging Face layout, a bundled zoo model (tiny-llada, tiny-dream, "
              f"tiny-sdar) or a hub id such as GSAI-ML/LLaDA-8B-Instruct. Default: {DEFAULT_MODEL}")


def _engine_options(p: argparse.ArgumentParser, model_positional: bool = False,
                    batch_flags: tuple[str, ...] = ("--max-batch-size",)) -> None:
    g = p.add_argument_group("model and engine")
    if model_positional:
        g.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    else:
        g.add_argument("--model", "-m", default=DEFAULT_MODEL, help=MODEL_HELP)
    g.add_argument("--cache", default=AUTO, metavar="{" + ",".join([AUTO, *CACHES]) + "}",
                   help="KV cache: none = recompute everything each step (exact); prefix = Fast-dLLM prefix cache "
                        "(prompt and finished blocks reused, refreshed at each block start); dual = Fast-dLLM dual "
                        "cache (also reuses the masked suffix after the block); block = exact block cache of "
                        "block-causal models (SDAR); dkv = dKV-Cache; elastic = Elastic-Cache; freecache = FreeCache "
                        "(see README: KV caches). Default: auto = the cache measured best with the strategy "
                        "(see --strategy), else the exact one (none; SDAR: block)")
    g.add_argument("--cache-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the cache, repeatable (e.g. refresh_interval=4 for dkv, gamma=0.9 for elastic)")
    g.add_argument("--strategy", default=AUTO, metavar="{" + ",".join([AUTO, *STRATEGIES]) + "}",
                   help="which masked positions a step commits: reference = the model family's own sampler "
                        "(LLaDA generate, Dream diffusion_generate, SDAR block_diffusion_generate); threshold = "
                        "Fast-dLLM, every position with confidence >= --threshold; factor = Fast-dLLM factor rule "
                        "(--factor); guided = FlashDLM's guided diffusion (needs --strategy-option guide=MODEL); s2d2 = S2D2 "
                        "self-speculation on SDAR (e.g. --strategy-option preset=config-a; README: S2D2); learn2pd = "
                        "Learn2PD's learned commit filter with end-of-text prediction (--strategy-option filter=PATH "
                        "from `dllm train-filter`; tiny-llada and tiny-dream ship one); saber = Saber, "
                        "adaptive commits with backtracking remasking (LLaDA, Dream; cache none; --strategy-option "
                        "mu=2|8, n=2); tidar = TiDAR's draft-verify-predraft decoding of a TiDAR model (--strategy-option "
                        "draft_length=K), ar = the same TiDAR model one token a forward (README: TiDAR). "
                        f"Default: auto = the fastest setting within 1 point of reference on the zoo ({describe()}; "
                        "BENCHMARKS.md); --strategy reference gives the published sampler")
    g.add_argument("--strategy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine-level option of the strategy, repeatable (e.g. guide=tiny-ar mode=speculative)")
    g.add_argument("--dtype", default="auto",
                   help="bfloat16, float16, float32, float64 or auto (bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (a GPU when there is one). On the CPU, torch uses OMP_NUM_THREADS "
                        "threads when set, else the cores this process may run on (see README: CPU threads)")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) when MODEL is a hub id")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own tokenizer code to run")
    g.add_argument(*batch_flags, dest="max_batch_size", type=int, default=32, metavar="N", help="most prompts decoded together in one batch")
    g.add_argument("--enforce-eager", action="store_true",
                   help="launch every kernel from Python instead of replaying CUDA graphs (same kernels, slower; "
                        "the CPU always runs eagerly)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="shard the model over N processes (GPUs with NCCL, CPU processes with gloo); N must divide "
                        "the heads and the vocabulary. Default: 1")


def _sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-tokens", "--gen-length", dest="max_tokens", type=int, default=None,
                   help="generation length (LLaDA's gen_length): MASK positions appended to the prompt; a row stops "
                        "earlier at a stop token. Default: the checkpoint's (128 for LLaDA). The zoo models were "
                        "trained on sequences of 160 tokens: keep prompt + max tokens within about 160 on them "
                        "(beyond, they answer with nothing or garbage)")
    g.add_argument("--block-length", type=int, default=None,
                   help="semi-autoregressive block size; must divide --max-tokens. Default: 32 for LLaDA")
    g.add_argument("--steps", type=int, default=None,
                   help="reference strategy: denoising steps; LLaDA and Dream: over the whole generation (a multiple "
                        "of the number of blocks); SDAR: per block. Default: one token a step")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 = greedy. Default: the checkpoint's generation_config.json, else 0")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (Dream, SDAR)")
    g.add_argument("--top-k", type=int, default=None, help="top-k sampling (Dream, SDAR); 0 = off")
    g.add_argument("--remasking", default=None, metavar="{" + ",".join(REMASKING) + "}",
                   help="reference strategy's commit rule. LLaDA: low_confidence (default) or random. SDAR: "
                        "low_confidence_dynamic (default), low_confidence_static, sequential, entropy_bounded")
    g.add_argument("--alg", default=None, metavar="{" + ",".join(DREAM_ALGS) + "}",
                   help="Dream's position rule (reference strategy). Default: the checkpoint's generation_config.json")
    g.add_argument("--alg-temp", type=float, default=None, help="Dream: draw positions from softmax(confidence / alg_temp)")
    g.add_argument("--eps", type=float, default=None, help="Dream: final time of the schedule (default 1e-3)")
    g.add_argument("--entropy-bound", type=float, default=None, help="SDAR entropy_bounded remasking: gamma (default 0.35)")
    g.add_argument("--cfg-scale", type=float, default=0.0, help="LLaDA: unsupervised classifier-free guidance scale; 0 = off")
    g.add_argument("--threshold", type=float, default=None,
                   help="threshold strategy: commit positions with confidence >= this (and the most confident one), "
                        "default 0.9; SDAR low_confidence_dynamic: the confidence to exceed, default 0.85")
    g.add_argument("--factor", type=float, default=None,
                   help="factor strategy: commit the top n with (n+1)(1-c_n) < factor. Default 1.0")
    g.add_argument("--logits-eos-inf", action="store_true", help="LLaDA: never sample EOS (its setting for code)")
    g.add_argument("--confidence-eos-eot-inf", action="store_true",
                   help="LLaDA: give EOS / end-of-turn predictions zero confidence so they are committed last")
    g.add_argument("--seed", type=int, default=None, help="random seed of each request (reproducible sampling)")
    g.add_argument("--keep-special-tokens", action="store_true", help="keep special tokens in the printed text")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dllm", description="Decode diffusion language models (LLaDA, Dream, SDAR) with KV caches and parallel decoding.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading and timing details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    _engine_options(gen)
    _sampling_options(gen)
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (several make a batch); stdin when none is given")
    gen.add_argument("--prompt", "-p", action="append", default=[], help="another prompt (repeatable)")
    gen.add_argument("--prompt-file", default=None, help="a file with one prompt per line")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap each prompt as a user turn in the checkpoint's chat template (default: when the "
                          "checkpoint has one); --no-chat sends the raw text")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt (text, token_ids, finish_reason, metrics)")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    chat = sub.add_parser("chat", help="interactive chat; the reply streams as blocks become final",
                          description="Interactive chat: each turn sends the whole conversation through the "
                                      "checkpoint's chat template. Ctrl-C cancels a reply, /reset starts a new "
                                      "conversation, /exit or Ctrl-D leaves. The bundled zoo models were trained on "
                                      "one question per conversation of at most 160 tokens: on them, /reset between "
                                      "questions.")
    _engine_options(chat)
    _sampling_options(chat)
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    from dllm.server.cli import add_serve_parser  # argparse only: FastAPI is imported when `serve` runs
    add_serve_parser(sub)
    from dllm.train.filter_cli import add_train_filter_parser
    add_train_filter_parser(sub)
    evaluate = sub.add_parser("eval", help="evaluate a model on a task (resumable; writes records, summary, report)")
    _eval_options(evaluate)
    bench = sub.add_parser("bench", help="evaluate every setting of a grid; table, speed-ups and Pareto plot")
    _eval_options(bench)
    bench.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2",
                       help="axes to sweep, e.g. strategies=reference,threshold caches=none,dual thresholds=0.7,0.9 "
                            "block-lengths=8,32; NAME is strategy, cache, batch-size or a decoding option (singular or "
                            "plural, - or _). A decoding option only reaches the strategies that read it; combinations "
                            "the runtime refuses are skipped and listed. The baseline row is reference/none")
    return parser


def _eval_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `dllm eval` and `dllm bench`: the engine and decoding options of `generate`, plus the task."""
    g = p.add_argument_group("task")
    g.add_argument("--task", "-t", required=True, help="gsm8k, humaneval, arith, gsm-lite or code-lite")
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N docs only (a later, larger limit extends the run)")
    g.add_argument("--data-file", default=None, help="the task's data (JSONL) instead of its default location")
    g.add_argument("--num-fewshot", type=int, default=None, help="gsm8k: worked examples in the prompt (default 5)")
    g.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="another option of the task (e.g. cot_zeroshot=true, timeout_s=10); VALUE is read as JSON when it parses")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt as chat messages through the checkpoint's chat template (default: the task's choice)")
    g.add_argument("--num-samples", type=int, default=1,
                   help="samples per doc, for pass@k (needs --temperature > 0); sample j of a doc has a fixed seed from --seed")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                   help="decode on N engine processes (one per GPU, or CPU processes sharing the cores), records "
                        "merged into one resumable run directory. Default: 1")
    o = p.add_argument_group("output")
    o.add_argument("--output", "-o", default=None,
                   help="run directory (default runs/eval/ or runs/bench/ + model, task and a hash of the setting); "
                        "re-running the same command there resumes")
    o.add_argument("--overwrite", action="store_true", help="replace a run of another setting in --output")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    o.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up request before the timed batches")
    _engine_options(p, batch_flags=("--batch-size", "--max-batch-size"))
    _sampling_options(p)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, block_length=args.block_length, steps=args.steps, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, remasking=args.remasking, alg=args.alg, alg_temp=args.alg_temp,
        eps=args.eps, entropy_bound=args.entropy_bound, cfg_scale=args.cfg_scale, threshold=args.threshold,
        factor=args.factor,
        logits_eos_inf=args.logits_eos_inf, confidence_eos_eot_inf=args.confidence_eos_eot_inf, seed=args.seed,
        skip_special_tokens=not args.keep_special_tokens)


def key_values(items: list[str], flag: str) -> dict:
    """["k=v", ...] from a repeatable CLI flag -> {k: v}, values read as JSON when they parse (numbers, booleans)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DllmError(f"{flag} {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_llm(args: argparse.Namespace):
    from dllm.api import LLM
    return LLM(args.model, cache=args.cache, strategy=args.strategy, dtype=args.dtype, device=args.device,
               revision=args.revision, trust_remote_code=args.trust_remote_code, max_batch_size=args.max_batch_size,
               cache_options=key_values(args.cache_option, "--cache-option"),
               strategy_options=key_values(args.strategy_option, "--strategy-option"),
               enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
               load_format=getattr(args, "load_format", "safetensors"),   # (dllm serve's options)
               skip_tokenizer_init=getattr(args, "skip_tokenizer_init", False))


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts) + list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as exc:
            raise DllmError(f"cannot read --prompt-file {args.prompt_file!r}: {exc.strerror}") from None
    if not prompts and not sys.stdin.isatty():
        text = sys.stdin.read().strip()
        prompts = [text] if text else []
    if not prompts:
        raise DllmError("no prompt given; pass --prompt TEXT, --prompt-file FILE, or text on stdin")
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if empty:  # "" would become BOS alone (or an empty user turn): nothing to answer
        raise DllmError(f"prompt {empty[0]} of {len(prompts)} is empty; give it some text")
    return prompts


def cmd_generate(args: argparse.Namespace) -> None:
    params = sampling_params(args)
    prompts = _read_prompts(args)
    llm = build_llm(args)
    chat = args.chat if args.chat is not None else bool(getattr(llm.tokenizer, "chat_template", None))
    inputs = [[{"role": "user", "content": p}] for p in prompts] if chat else prompts
    from tqdm import tqdm
    outputs = {}
    events = llm.stream_chat(inputs, params) if chat else llm.stream(inputs, params)
    with tqdm(total=len(prompts), desc="generating", unit="req", disable=True if args.no_progress else None,
              file=sys.stderr) as bar:
        for event in events:
            bar.set_postfix(block=f"{event.block_index + 1}/{event.num_blocks}")
            if event.output is not None:
                outputs[event.request_id] = event.output
                bar.update(1)
    for i, out in enumerate(outputs[k] for k in sorted(outputs, key=int)):
        m = out.metrics
        if args.json:
            print(json.dumps({"prompt": prompts[i], "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason, "metrics": vars(m)}))
        else:
            if len(prompts) > 1:
                print(f"=== prompt {i + 1} ===")
            print(out.text)
        print(f"[{m.num_tokens} tokens, {m.nfe} forwards, {m.tokens_per_forward:.2f} tokens/forward, "
              f"{m.tokens_per_second:.1f} tokens/s, {m.latency_s:.2f} s, finish: {out.finish_reason}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from dllm import chat
    params = sampling_params(args)
    chat.run(build_llm(args), params, args.system)


def eval_config(args: argparse.Namespace):
    from dllm.eval.runner import EvalConfig, sampling_dict
    options = {"data_file": args.data_file, "num_fewshot": args.num_fewshot}
    options = {k: v for k, v in options.items() if v is not None}
    options.update(key_values(args.task_option, "--task-option"))
    return EvalConfig(task=args.task, model=args.model, task_options=options, chat=args.chat,
                      num_samples=args.num_samples, batch_size=args.max_batch_size, cache=args.cache,
                      strategy=args.strategy, sampling=sampling_dict(sampling_params(args)), seed=args.seed or 0,
                      device=args.device, dtype=args.dtype, revision=args.revision,
                      trust_remote_code=args.trust_remote_code, enforce_eager=args.enforce_eager,
                      tensor_parallel_size=args.tensor_parallel_size,
                      cache_options=key_values(args.cache_option, "--cache-option"),
                      strategy_options=key_values(args.strategy_option, "--strategy-option"))


def cmd_eval(args: argparse.Namespace) -> None:
    from dllm.eval import report, runner
    config = eval_config(args)
    summary = runner.run(config, args.output or runner.default_output_dir(config), limit=args.limit,
                         overwrite=args.overwrite, progress=not args.no_progress, warmup=not args.no_warmup,
                         data_parallel_size=args.data_parallel_size)
    print(report.metrics_table(summary))
    print(json.dumps({"output_dir": summary.output_dir, "primary_metric": summary.primary_metric,
                      "metrics": summary.metrics}))


def cmd_bench(args: argparse.Namespace) -> None:
    from dllm.eval import bench, report
    config = eval_config(args)
    axes = bench.parse_grid(args.grid)
    result = bench.bench(config, axes, args.output, limit=args.limit, overwrite=args.overwrite,
                         progress=not args.no_progress, warmup=not args.no_warmup,
                         data_parallel_size=args.data_parallel_size)
    print(report.bench_markdown(result.rows, result.refused, result.primary_metric), end="")
    print(json.dumps({"output_dir": result.output_dir, "primary_metric": result.primary_metric,
                      "rows": [{"setting": r["setting"], result.primary_metric: r["metrics"].get(result.primary_metric),
                                "throughput": r["metrics"]["throughput"], "speedup": r["speedup"]} for r in result.rows],
                      "refused": result.refused}))


def cmd_train_filter(args: argparse.Namespace) -> None:
    from dllm.train.filter_cli import cmd_train_filter as run
    run(args)


def cmd_serve(args: argparse.Namespace) -> None:
    from dllm.server.cli import run_serve
    run_serve(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "eval": cmd_eval,
         "bench": cmd_bench, "train-filter": cmd_train_filter}[args.command](args)
    except DllmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `dllm` command: `dllm generate` (one-shot, prompts from arguments, a file or stdin) and `dllm chat`
(interactive; text streams as blocks become final). Every decoding and cache option of the API is exposed.
User errors print one line, `error: ...`, and exit with status 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from cache import CACHES
from decoding import STRATEGIES
from dllm.errors import DllmError
from dllm.sampling_params import DREAM_ALGS, REMASKING, SamplingParams
from dllm.zoo import DEFAULT_MODEL


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see '{self.prog} --help'\n")


MODEL_HELP = ("checkpoint directory in the Hugging Face layout, a bundled zoo model (tiny-llada, tiny-dream, "
              f"tiny-sdar) or a hub id such as GSAI-ML/LLaDA-8B-Instruct. Default: {DEFAULT_MODEL}")


def _engine_options(p: argparse.ArgumentParser, model_positional: bool = False) -> None:
    g = p.add_argument_group("model and engine")
    if model_positional:
        g.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    else:
        g.add_argument("--model", "-m", default=DEFAULT_MODEL, help=MODEL_HELP)
    g.add_argument("--cache", default="none", metavar="{" + ",".join(CACHES) + "}",
                   help="KV cache: none = recompute everything each step (exact); prefix = Fast-dLLM prefix cache "
                        "(prompt and finished blocks reused, refreshed at each block start); dual = Fast-dLLM dual "
                        "cache (also reuses the masked suffix after the block); block = exact block cache of "
                        "block-causal models (SDAR). Default: none")
    g.add_argument("--strategy", default="reference", metavar="{" + ",".join(STRATEGIES) + "}",
                   help="which masked positions a step commits: reference = the model family's own sampler "
                        "(LLaDA generate, Dream diffusion_generate, SDAR block_diffusion_generate); threshold = "
                        "Fast-dLLM, every position with confidence >= --threshold; factor = Fast-dLLM factor rule "
                        "(--factor). Default: reference")
    g.add_argument("--dtype", default="auto", help="bfloat16, float16, float32 or auto (bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) when MODEL is a hub id")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own tokenizer code to run")
    g.add_argument("--max-batch-size", type=int, default=32, help="most prompts decoded together in one batch")


def _sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-tokens", "--gen-length", dest="max_tokens", type=int, default=None,
                   help="generation length (LLaDA's gen_length): MASK positions appended to the prompt; a row stops "
                        "earlier at a stop token. Default: the checkpoint's (128 for LLaDA)")
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
    chat = sub.add_parser("chat", help="interactive chat; the reply streams as blocks become final")
    _engine_options(chat)
    _sampling_options(chat)
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    from dllm.server.cli import add_serve_parser  # argparse only: FastAPI is imported when `serve` runs
    add_serve_parser(sub)
    return parser


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, block_length=args.block_length, steps=args.steps, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, remasking=args.remasking, alg=args.alg, alg_temp=args.alg_temp,
        eps=args.eps, entropy_bound=args.entropy_bound, cfg_scale=args.cfg_scale, threshold=args.threshold,
        factor=args.factor,
        logits_eos_inf=args.logits_eos_inf, confidence_eos_eot_inf=args.confidence_eos_eot_inf, seed=args.seed,
        skip_special_tokens=not args.keep_special_tokens)


def build_llm(args: argparse.Namespace):
    from dllm.api import LLM
    return LLM(args.model, cache=args.cache, strategy=args.strategy, dtype=args.dtype, device=args.device,
               revision=args.revision, trust_remote_code=args.trust_remote_code, max_batch_size=args.max_batch_size)


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
    params = sampling_params(args)
    llm = build_llm(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("dllm chat: type a message; /reset clears the conversation, /exit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = None
        for event in llm.stream_chat(history, params):
            sys.stdout.write(event.delta_text)
            sys.stdout.flush()
            reply = event.output or reply
        print()
        history.append({"role": "assistant", "content": reply.text})
        m = reply.metrics
        print(f"[{m.num_tokens} tokens, {m.nfe} forwards, {m.tokens_per_second:.1f} tokens/s]", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    from dllm.server.cli import run_serve
    run_serve(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve}[args.command](args)
    except DllmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`dllm train-filter`: the argparse part and the command (kept beside the trainer, so `dllm/cli.py` only
registers it)."""
from __future__ import annotations

import argparse
import json


def add_train_filter_parser(sub) -> None:
    p = sub.add_parser("train-filter", help="train a Learn2PD commit filter for a model (for --strategy learn2pd)",
                       description="Replay the model's reference sampler on a task's train split (resumable), train "
                                   "the Learn2PD filter with BCE, report its held-out accuracy and write NAME.json + "
                                   "NAME.safetensors, to use as --strategy learn2pd --strategy-option filter=NAME.json")
    p.add_argument("--model", "-m", required=True, help="checkpoint directory, zoo model or hub id")
    p.add_argument("--task", "-t", action="append", required=True, metavar="TASK",
                   help="a zoo task whose train split gives the prompts (arith, gsm-lite, code-lite); repeatable")
    p.add_argument("--output", "-o", required=True, help="the filter to write (NAME or NAME.json)")
    p.add_argument("--data-dir", default=None, help="where the replay records go (default: NAME.data/); re-running "
                                                    "the same command resumes there")
    p.add_argument("--num-problems", type=int, default=200, help="train-split problems per task. Default 200")
    p.add_argument("--max-tokens", type=int, default=None, help="generation length (default: the checkpoint's)")
    p.add_argument("--block-length", type=int, default=32, help="block length the filter is for. Default 32")
    p.add_argument("--epochs", type=int, default=40000, help="full-batch epochs (the authors': 40000)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate. Default 3e-3")
    p.add_argument("--threshold", type=float, default=0.96, help="the filter's accept threshold. Default 0.96")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts replayed together. Default 16")
    p.add_argument("--raw-prompts", action="store_true", help="the problem text without the chat template")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    p.add_argument("--dtype", default="auto", help="bfloat16, float16, float32 or auto")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def cmd_train_filter(args: argparse.Namespace) -> None:
    from dllm.errors import InvalidParameterError
    from dllm.train.filter import FilterTrainConfig, train_filter
    for name in ("num_problems", "block_length", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.threshold < 1:
        raise InvalidParameterError("--threshold must be in (0, 1)")
    report = train_filter(FilterTrainConfig(
        model=args.model, tasks=args.task, out=args.output, data_dir=args.data_dir, num_problems=args.num_problems,
        max_tokens=args.max_tokens, block_length=args.block_length, epochs=args.epochs, lr=args.lr,
        threshold=args.threshold, seed=args.seed, batch_size=args.batch_size, raw_prompts=args.raw_prompts,
        device=args.device, dtype=args.dtype, progress=not args.no_progress))
    report.pop("loss_history")
    print(f"filter: {report['filter']}  held-out accuracy {report['test_accuracy']:.4f} "
          f"(majority {report['test_majority_accuracy']:.4f}), precision {report['test_precision']}, "
          f"{report['records']} records from {report['prompts']} prompts")
    print(json.dumps(report))

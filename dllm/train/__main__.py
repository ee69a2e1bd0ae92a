"""`python -m dllm.train`: build the zoo tokenizer, or train one model. See `trainer.py`."""
from __future__ import annotations

import argparse
import json
import logging

from dllm.train.trainer import FAMILIES, TrainConfig, train


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dllm.train", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="build the shared zoo tokenizer")
    tok.add_argument("--out", required=True)
    tok.add_argument("--vocab-size", type=int, default=1024)
    zoo = sub.add_parser("zoo", help="train and evaluate the whole zoo (tokenizer, tiny-ar/llada/dream/sdar)")
    zoo.add_argument("--out", required=True)
    zoo.add_argument("--steps", type=int, default=6000)
    zoo.add_argument("--batch-size", type=int, default=None)
    zoo.add_argument("--num-problems", type=int, default=200, help="test problems a task for the model cards")
    zoo.add_argument("--max-seconds", type=float, default=None, help="training time budget per model")
    zoo.add_argument("--lr", type=float, default=None, help="peak learning rate (default: TrainConfig's)")
    zoo.add_argument("--resume", action="store_true", help="continue training the models already in --out")
    zoo.add_argument("--eval-only", action="store_true", help="only evaluate the models in --out and rewrite their cards")
    zoo.add_argument("--seed", type=int, default=None, help="data order and initialisation seed")
    zoo.add_argument("--families", default=None,
                     help="comma-separated subset of ar,llada,dream,sdar,tidar (dream and tidar start from an AR model)")
    zoo.add_argument("--init-from", default=None, help="AR checkpoint (Qwen2 layout) that dream and tidar start from "
                     "(default: <out>/tiny-ar when trained, else the bundled tiny-ar)")
    zoo.add_argument("--alpha", type=float, default=None, help="TiDAR: AR loss weight (default 1)")
    zoo.add_argument("--draft-length", type=int, default=None, help="TiDAR: drafts per step (default 8; block = +1)")
    run = sub.add_parser("model", help="train one model")
    run.add_argument("--family", required=True, choices=FAMILIES)
    run.add_argument("--out", required=True)
    run.add_argument("--tokenizer", required=True, help="directory written by `tokenizer`")
    for name, kind in (("steps", int), ("batch-size", int), ("lr", float), ("seq-len", int), ("hidden-size", int),
                       ("num-layers", int), ("num-heads", int), ("num-kv-heads", int), ("intermediate-size", int),
                       ("block-size", int), ("seed", int), ("log-every", int), ("draft-length", int),
                       ("alpha", float)):
        run.add_argument(f"--{name}", type=kind, default=None)
    run.add_argument("--tasks", default=None, help='JSON: {"arith": 100000, ...} training problems per task')
    run.add_argument("--init-from", default=None, help="checkpoint in the Qwen2 layout to start from (Dream from AR)")
    run.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "zoo":
        from dllm.train.zoo import main as zoo_main
        zoo_main(args)
        return
    if args.command == "tokenizer":
        from dllm.zoo.tokenizer import build_zoo_tokenizer, save_tokenizer
        save_tokenizer(build_zoo_tokenizer(args.vocab_size), args.out)
        return
    options = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "tasks")}
    if args.tasks:
        options["tasks"] = json.loads(args.tasks)
    print(train(TrainConfig(**options)))


if __name__ == "__main__":
    main()

"""Training the whole zoo in one command: the shared tokenizer, tiny-ar (causal LM, Qwen2 layout), tiny-llada,
tiny-dream (initialised from tiny-ar, as Dream came from Qwen2.5), tiny-sdar (native block 4) and tiny-tidar
(initialised from tiny-ar: TiDAR continues pretraining an AR model); then each diffusion model is evaluated on
the held-out test split under its settings (three; TiDAR: its own decoding and plain AR) and gets a model card.

    python -m dllm.train zoo --out zoo --steps 6000
"""
from __future__ import annotations

import json
import pathlib
import time

from dllm.train.trainer import TrainConfig, train

CARD = """# {name}

A small {family_long} trained by dllm on its checkable tasks (arith, gsm-lite, code-lite), saved in the real
{layout} checkpoint layout so that the family's real loader reads it. It ships inside the dllm package.

## Training
- objective: {objective}
- data: chat-formatted train splits of the zoo tasks ({tasks}); the test splits are disjoint by construction
- model: {params:,} parameters ({layers} layers, hidden {hidden}, {heads} heads, FFN {ffn}), vocab {vocab}, fp16 on disk
- sequence length {seq_len}, AdamW (cosine schedule with warmup), bf16 autocast; stages:
{stages}
- total: {total_steps} steps, {total_seconds} s on {hardware} (torch {torch})
- loss curve of the last stage: `loss.png`; full record: `training.json`

## Accuracy (held-out test split, {num_problems} problems a task, greedy)
{settings}

{table}
{notes}
Command: `{command}`
"""

DESCRIPTIONS = {
    "llada": ("masked-diffusion LM (LLaDA family)", "LLaDA (`model_type` llada, OLMo tensor names)",
              "masked diffusion as LLaDA: random masking ratio t, cross-entropy on masked response tokens weighted 1/t"),
    "dream": ("masked-diffusion LM (Dream family)", "Dream (`model_type` Dream, Qwen2 tensor names)",
              "masked diffusion with Dream's shifted logits (token i predicted from position i - 1)"),
    "sdar": ("block-diffusion LM (SDAR family)", "SDAR (`model_type` sdar, Qwen3 tensor names)",
             "block diffusion as SDAR: blocks of 4 from position 0, noisy blocks attend to themselves and to clean earlier blocks"),
    "tidar": ("hybrid diffusion-AR LM (TiDAR family)", "TiDAR (`model_type` tidar, Qwen2 tensor names)",
              "TiDAR's: the clean sequence with next-token loss (causal) plus an all-MASK copy cut into blocks of "
              "draft_length + 1, each MASK block seeing the clean tokens before it and itself; "
              "L = (alpha L_AR + L_diff) / (1 + alpha), alpha = 1"),
}

SETTINGS_TEXT = {
    "tidar": "Settings: `tidar` = TiDAR decoding (one forward drafts, verifies and pre-drafts; greedy verification, "
             "so its tokens are exactly those of `ar`); `ar` = the same model decoded autoregressively, one token a forward.",
}


def _settings_text(family: str) -> str:
    if family in SETTINGS_TEXT:
        return SETTINGS_TEXT[family]
    sdar_note = " (static low-confidence, 4 steps per 4-token block)" if family == "sdar" else ""
    sdar_aggressive = " (SDAR: blocks of 32 tokens, each decoded in one step)" if family == "sdar" else ""
    return (f"Settings: `reference` = the family's own sampler at one token a step{sdar_note}; `aggressive` = a fixed "
            f"32 tokens\na step with no threshold{sdar_aggressive}; `threshold` = Fast-dLLM threshold decoding at 0.9.")


FAMILY_ORDER = ("ar", "llada", "dream", "sdar", "tidar")  # tiny-dream and tiny-tidar start from tiny-ar
FROM_AR = ("dream", "tidar")


def _ar_init(root: pathlib.Path, init_from: str | None) -> str:
    """The AR checkpoint a model of FROM_AR starts from: --init-from, else the zoo's own tiny-ar, else the bundled one."""
    from dllm.zoo import MODELS_DIR
    if init_from:
        return init_from
    own = root / "tiny-ar"
    return str(own if (own / "model.safetensors").is_file() else MODELS_DIR / "tiny-ar")


def train_zoo(out: str, steps: int, batch_size: int = 128, num_problems: int = 200, max_seconds: float | None = None,
              families=FAMILY_ORDER, resume: bool = False, eval_only: bool = False, init_from: str | None = None,
              **overrides) -> dict:
    from dllm.zoo.tokenizer import build_zoo_tokenizer, save_tokenizer
    root = pathlib.Path(out)
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        save_tokenizer(build_zoo_tokenizer(), tok_dir)
    common = dict(tokenizer=str(tok_dir), steps=steps, batch_size=batch_size, max_seconds=max_seconds, **overrides)
    summary = {}
    for family in families:
        path = root / f"tiny-{family}"
        init = _ar_init(root, init_from) if family in FROM_AR else None
        if resume and (path / "model.safetensors").is_file():
            init = str(path)  # continue training the existing model
        if not eval_only:
            train(TrainConfig(family=family, out=str(path), init_from=init, **common))
        if family == "ar":
            write_ar_card(path, num_problems)
        else:
            summary[family] = write_card(path, family, num_problems)
    return summary


def write_card(path: pathlib.Path, family: str, num_problems: int, results=None, notes: str = "") -> list[dict]:
    """Evaluate (unless `results` are given) and write the model card; the results are kept in results.json."""
    from dllm.zoo.evaluate import TaskResult, evaluate, table
    record = json.loads((path / "training.json").read_text())
    cfg = record["config"]
    if results is None:
        results = evaluate(str(path), num_problems=num_problems)
    results = [r if isinstance(r, TaskResult) else TaskResult(**r) for r in results]
    (path / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=1) + "\n")
    long, layout, objective = DESCRIPTIONS[family]
    vocab = json.loads((path / "config.json").read_text()).get("vocab_size")
    (path / "README.md").write_text(CARD.format(
        name=path.name, family_long=long, layout=layout, objective=objective, tasks=", ".join(cfg["tasks"]),
        params=record["parameters"], layers=cfg["num_layers"], hidden=cfg["hidden_size"], heads=cfg["num_heads"],
        ffn=cfg["intermediate_size"], vocab=vocab, seq_len=cfg["seq_len"], stages=_stages(record),
        total_steps=sum(r["config"]["steps"] for r in record["previous"] + [record]),
        total_seconds=round(sum(r["train_seconds"] for r in record["previous"] + [record])),
        hardware=record["hardware"], torch=record["torch"], num_problems=num_problems,
        settings=_settings_text(family),
        table=table(results), notes=notes, command="python -m dllm.train zoo --out <dir> (see BENCHMARKS.md for the exact stages run)"))
    return [r.__dict__ for r in results]


def _stages(record: dict) -> str:
    lines = []
    for r in record.get("previous", []) + [record]:
        c = r["config"]
        start = f"from {pathlib.Path(c['init_from']).name}" if c["init_from"] else "from scratch"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"  - {c['steps']} steps at batch {c['batch_size']}, peak lr {c['lr']}, seed {c['seed']}, "
                     f"{start}, {r['train_seconds']} s{note}")
    return "\n".join(lines)


def write_ar_card(path: pathlib.Path, num_problems: int = 200) -> None:
    from dllm.zoo.evaluate import evaluate_ar, table
    record = json.loads((path / "training.json").read_text())
    cfg = record["config"]
    results = evaluate_ar(str(path), num_problems=num_problems)
    (path / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=1) + "\n")
    (path / "README.md").write_text(
        f"# {path.name}\n\nA small causal LM in the Qwen2 layout (`model_type` qwen2), loadable with "
        "`transformers.AutoModelForCausalLM`; trained by dllm on the zoo tasks as the autoregressive baseline "
        "and the starting point of tiny-dream.\n\n"
        "Load its tokenizer with `transformers.PreTrainedTokenizerFast.from_pretrained(path)` (or "
        "`dllm.zoo.tokenizer.load_tokenizer`), not `AutoTokenizer`: for `model_type` qwen2, AutoTokenizer builds "
        "`Qwen2Tokenizer`, which keeps this vocabulary but swaps in Qwen2's pre-tokenizer, so text is split "
        "differently from training and accuracy collapses. Token ids are shared with the zoo's diffusion models.\n\n"
        f"- {record['parameters']:,} parameters; {cfg['steps']} steps at batch {cfg['batch_size']}; "
        f"{record['train_seconds']} s on {record['hardware']} (torch {record['torch']}); seed {cfg['seed']}\n"
        "- loss curve: `loss.png`; full record: `training.json`\n\n"
        f"## Accuracy (held-out test split, {num_problems} problems a task, greedy `generate` with transformers)\n\n"
        f"{table(results)}\n")


def main(args) -> None:
    start = time.perf_counter()
    families = args.families.split(",") if args.families else FAMILY_ORDER
    extra = {"lr": args.lr} if args.lr else {}
    if args.seed is not None:
        extra["seed"] = args.seed
    if args.alpha is not None:
        extra["alpha"] = args.alpha
    if args.draft_length is not None:
        extra["draft_length"] = args.draft_length
    summary = train_zoo(args.out, args.steps, args.batch_size or 128, args.num_problems, args.max_seconds, families,
                        resume=args.resume, eval_only=args.eval_only, init_from=args.init_from, **extra)
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "results": summary}))

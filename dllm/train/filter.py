"""Making a Learn2PD filter for a model (`dllm train-filter`): training data by oracle replay, BCE training, the
held-out accuracy, the filter file (`dllm.decoding.l2p_filter`).

Data, as the authors' `llada/generate_training_data.py::generate_data` makes it: per prompt,
  1. the reference output y*: the family's reference sampler at temperature 0, one token a step (steps =
     max_tokens), the whole canvas decoded (no stop at EOS);
  2. the Extremely-Greedy-Parallel replay from scratch: per block, per step, one forward; record the block's
     confidences c = p(x0) (every position, committed ones included) and labels x0 == y*; commit x0 wherever it
     equals y*; when a step's block proposal equals the previous step's (it would never finish), copy y* into the
     block (that step's record is kept).
Prompts: the zoo task's train split (never test), rendered with the checkpoint's chat template as at evaluation
(`--raw-prompts`: the problem text alone, as the authors tokenise FLAN). Records go to `DATA_DIR/records.jsonl`, one
line per prompt, appended batch by batch, so an interrupted run resumes where it stopped.

Training, as the authors' `train.ipynb`: shuffle the records (seeded), 80/10/10 train/validation/test, full-batch
AdamW (lr 3e-3) on BCE-with-logits for `epochs` epochs; the filter kept is the one of lowest validation loss; the
report gives the test split's accuracy, precision and false-positive share at the filter's threshold.
"""
from __future__ import annotations

import json
import pathlib
import time
from dataclasses import dataclass, field

import torch

from dllm.decoding.base import Strategy
from dllm.decoding.l2p_filter import DEFAULT_THRESHOLD, Filter, FilterConfig, ParallelFilter, save_filter
from dllm.errors import InvalidParameterError


@dataclass
class FilterTrainConfig:
    model: str
    tasks: list[str]
    out: str                                  # the filter path (NAME, NAME.json or NAME.safetensors)
    data_dir: str | None = None               # default: OUT.data/
    num_problems: int = 200                   # train-split problems per task
    max_tokens: int | None = None             # default: the checkpoint's
    block_length: int = 32
    epochs: int = 40000
    lr: float = 3e-3
    threshold: float = DEFAULT_THRESHOLD
    seed: int = 0
    batch_size: int = 16
    raw_prompts: bool = False
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    extra: dict = field(default_factory=dict)


class EGPReplay(Strategy):
    """The oracle replay as a strategy: `state["targets"]` [B, G] holds each row's y*; records per row go to
    `state["records"]` (a list of lists, in row order of the batch)."""

    name = "egp-replay"
    families = ("llada", "dream")
    options = ("steps",)
    steps_mode = "total"
    confidence_dtype = None   # generate_data takes the softmax in the logits' dtype

    def max_forwards(self, block_length: int) -> int:
        return block_length + 2

    def begin_block(self, masked: torch.Tensor) -> None:
        super().begin_block(masked)
        if not hasattr(self, "rows"):
            self.rows = list(range(masked.shape[0]))
            self.targets = self.state["targets"].to(masked.device)
        self.prev: list[torch.Tensor | None] = [None] * masked.shape[0]
        self.steps = [0] * masked.shape[0]

    def step(self, logits, masked, generators, first_only=False):
        x0, probs = self.propose(logits, self.params, generators, self.token_ids(logits.device), None, None)
        conf = probs.gather(-1, x0[..., None]).squeeze(-1)                     # [B, L]
        lo = self.block_start - self.canvas.gen_start
        target = self.targets[:, lo:lo + x0.shape[1]]
        correct = x0 == target
        commit = correct.clone()
        active = masked.any(-1).tolist()
        for r, on in enumerate(active):
            if not on:
                continue
            self.state["records"][self.rows[r]].append(
                {"step": self.steps[r], "confidence": conf[r].float().tolist(), "is_correct": correct[r].tolist()})
            if self.prev[r] is not None and bool((x0[r] == self.prev[r]).all()):
                x0[r], commit[r] = target[r], True                               # stalled: copy y* in
                continue
            self.prev[r] = x0[r].clone()
            self.steps[r] += 1
        self.step_index += 1
        return x0, commit & masked

    def select_rows(self, keep: torch.Tensor) -> None:
        idx = keep.tolist()
        self.rows = [self.rows[i] for i in idx]
        self.targets = self.targets[keep]
        self.prev = [self.prev[i] for i in idx]
        self.steps = [self.steps[i] for i in idx]


def replay_records(llm, prompts: list[list[int]], max_tokens: int, block_length: int) -> list[list[dict]]:
    """Per prompt (token ids), the replay's records. `llm` must use strategy 'reference' and cache 'none'."""
    from dllm.sampling_params import SamplingParams
    sp = SamplingParams(max_tokens=max_tokens, block_length=block_length, steps=max_tokens, temperature=0,
                        ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    engine = llm.engine
    reference = (engine.strategy_cls, engine.strategy_state)
    targets = [o.token_ids for o in llm.generate(inputs, sp)]
    state = {"targets": torch.tensor(targets, dtype=torch.long), "records": [[] for _ in prompts]}
    engine.strategy_cls, engine.strategy_state = EGPReplay, state
    try:
        llm.generate(inputs, sp)
    finally:
        engine.strategy_cls, engine.strategy_state = reference
    return state["records"]


def training_prompts(llm, tasks: list[str], num_problems: int, raw: bool) -> list[tuple[str, list[int]]]:
    """(problem id, prompt ids) of each task's first `num_problems` train-split problems."""
    from dllm.eval.tasks import TASKS, get_task, to_messages
    out = []
    for name in tasks:
        if name not in TASKS:
            raise InvalidParameterError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
        for i, problem in enumerate(get_task(name).generate("train", num_problems)):
            text = problem.prompt if raw else llm.apply_chat_template(to_messages(problem))
            ids = llm.tokenizer.encode(text, add_special_tokens=raw)
            out.append((f"{name}/train/{i}", ids))
    return out


class RecordStore:
    """`records.jsonl` (one prompt a line) + `meta.json` (the setting; a resume under another is refused)."""

    def __init__(self, root: pathlib.Path, meta: dict):
        self.root, self.path = root, root / "records.jsonl"
        root.mkdir(parents=True, exist_ok=True)
        meta_path = root / "meta.json"
        if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
            raise InvalidParameterError(f"{root} holds training data of another setting "
                                        f"({meta_path}); use another --data-dir or delete it")
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        self.done: dict[str, list] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:       # a line cut short by an interruption: redone
                    continue
                self.done[row["id"]] = row["records"]
        self._rewrite()

    def _rewrite(self) -> None:
        with open(self.path, "w") as f:
            for key, records in self.done.items():
                f.write(json.dumps({"id": key, "records": records}) + "\n")

    def add(self, key: str, records: list) -> None:
        self.done[key] = records
        with open(self.path, "a") as f:
            f.write(json.dumps({"id": key, "records": records}) + "\n")

    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else 0


def fit(features: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float, seed: int, threshold: float,
        device: torch.device, progress: bool = False) -> tuple[ParallelFilter, dict]:
    """Train on [N, L] confidences and 0/1 labels (80/10/10 split of a seeded shuffle); returns the net of lowest
    validation loss and its report (losses, test accuracy, precision, false-positive share at `threshold`)."""
    from tqdm import tqdm
    if device.type == "cpu":
        from dllm.threads import configure_cpu_threads
        configure_cpu_threads()       # torch's default spins on every core: many times slower on a busy machine
    n, width = features.shape
    if n < 10:
        raise InvalidParameterError(f"only {n} training records; use more problems (--num-problems)")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    x, y = features[order].float().to(device), labels[order].float().to(device)
    a, b = int(n * 0.8), int(n * 0.8) + int(n * 0.1)
    torch.manual_seed(seed)
    net = ParallelFilter(width).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best, best_state, history = float("inf"), None, []
    bar = tqdm(range(epochs), desc="training filter", unit="epoch", disable=not progress, mininterval=1.0)
    for epoch in bar:
        opt.zero_grad()
        loss = loss_fn(net(x[:a]), y[:a])
        loss.backward()
        opt.step()
        if epoch % 50 == 0 or epoch == epochs - 1:
            with torch.no_grad():
                val = loss_fn(net(x[a:b]), y[a:b]).item()
            history.append((epoch, round(loss.item(), 5), round(val, 5)))
            if val < best:
                best, best_state = val, {k: v.detach().clone() for k, v in net.state_dict().items()}
            bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{val:.4f}")
    net.load_state_dict(best_state)
    report = {"records": n, "train": a, "validation": b - a, "test": n - b, "epochs": epochs, "lr": lr,
              "first_loss": history[0][1], "final_loss": history[-1][1], "best_validation_loss": round(best, 5),
              **held_out(net, x[b:], y[b:], threshold), "loss_history": history}
    return net.cpu().eval(), report


@torch.no_grad()
def held_out(net: ParallelFilter, x: torch.Tensor, y: torch.Tensor, threshold: float) -> dict:
    pred = torch.sigmoid(net(x)) > threshold
    truth = y > 0.5
    accepted = int(pred.sum())
    return {"test_accuracy": round(float((pred == truth).float().mean()), 4),
            "test_precision": round(float((pred & truth).sum()) / accepted, 4) if accepted else None,
            "test_accept_rate": round(accepted / pred.numel(), 4),
            "test_label_rate": round(float(truth.float().mean()), 4),
            "test_majority_accuracy": round(max(float(truth.float().mean()), 1 - float(truth.float().mean())), 4)}


def train_filter(cfg: FilterTrainConfig) -> dict:
    """Generate (or resume) the data, train, write the filter and return the report."""
    from tqdm import tqdm
    from dllm import LLM
    llm = LLM(cfg.model, strategy="reference", cache="none", device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    spec = llm.spec
    max_tokens = cfg.max_tokens or spec.defaults.get("max_tokens", 128)
    if max_tokens % cfg.block_length:
        raise InvalidParameterError(f"max_tokens {max_tokens} is not a multiple of block_length {cfg.block_length}")
    out = pathlib.Path(cfg.out)
    data_dir = pathlib.Path(cfg.data_dir) if cfg.data_dir else out.with_suffix("").with_name(out.stem + ".data")
    meta = {"model": cfg.model, "max_tokens": max_tokens, "block_length": cfg.block_length,
            "raw_prompts": cfg.raw_prompts, "dtype": str(next(llm.loaded.model.parameters()).dtype)}
    store = RecordStore(data_dir, meta)
    todo = [(k, ids) for k, ids in training_prompts(llm, cfg.tasks, cfg.num_problems, cfg.raw_prompts)
            if k not in store.done]
    t0 = time.perf_counter()
    with tqdm(total=len(todo), desc="replaying the reference sampler", unit="prompt", disable=not cfg.progress) as bar:
        for i in range(0, len(todo), cfg.batch_size):
            chunk = todo[i:i + cfg.batch_size]
            for (key, _), records in zip(chunk, replay_records(llm, [ids for _, ids in chunk], max_tokens,
                                                               cfg.block_length)):
                store.add(key, records)
            bar.update(len(chunk))
    data_seconds = time.perf_counter() - t0
    records = [r for rows in store.done.values() for r in rows]
    x = torch.tensor([r["confidence"] for r in records], dtype=torch.float32)
    y = torch.tensor([r["is_correct"] for r in records], dtype=torch.float32)
    device = next(llm.loaded.model.parameters()).device
    t1 = time.perf_counter()
    net, report = fit(x, y, cfg.epochs, cfg.lr, cfg.seed, cfg.threshold, device, cfg.progress)
    report.update(data_seconds=round(data_seconds, 1), train_seconds=round(time.perf_counter() - t1, 1),
                  prompts=len(store.done), data_bytes=store.size_bytes(),
                  prompts_per_task=_per_task(store.done), tasks=cfg.tasks, split="train",
                  num_problems=cfg.num_problems, max_tokens=max_tokens, device=str(device))
    history = report.pop("loss_history")
    config = FilterConfig(model=cfg.model, family=spec.family, vocab_size=llm.loaded.arch.vocab_size,
                          block_length=cfg.block_length, threshold=cfg.threshold,
                          training={**report, **cfg.extra})
    path = save_filter(out, Filter(config, net))
    path.with_suffix(".md").write_text(card(cfg, config, report))
    report["filter"], report["loss_history"] = str(path), history
    return report


CARD = """# Learn2PD filter for {model}

A 2-layer {width}->{width}->{width} MLP (`dllm.decoding.l2p_filter`, {params:,} parameters) for `--strategy learn2pd`
on {model} ({family}), blocks of {width}, accept threshold {threshold}.

- **data**: oracle replay of the reference sampler (one token a step, {max_tokens} tokens, temperature 0) on the
  **train** split of {tasks} ({prompts} prompts: {per_task}; {prompt_format}); {records:,}
  records (one per block step: {width} confidences, {width} labels), {data_mb:.2f} MB of JSONL, {data_seconds} s on {device}
- **training**: {epochs:,} full-batch epochs of AdamW (lr {lr}) on BCE, 80/10/10 split of the shuffled records
  (seed {seed}); loss {first_loss} -> {final_loss}, best validation loss {best_validation_loss} (the weights kept);
  {train_seconds} s
- **held-out accuracy** (test split, {test} records, per position, at {threshold}): {test_accuracy:.4f}; precision of
  the accepts {test_precision}; accept rate {test_accept_rate}; label rate {test_label_rate} (majority-class
  accuracy {test_majority_accuracy:.4f})

Command: `dllm train-filter --model {model} {task_flags} --num-problems {num_problems} --epochs {epochs} --output NAME`
"""


def _per_task(done: dict) -> dict:
    counts: dict[str, int] = {}
    for key in done:                                  # "<task>/train/<i>"
        counts[key.split("/")[0]] = counts.get(key.split("/")[0], 0) + 1
    return counts


def card(cfg: FilterTrainConfig, config: FilterConfig, report: dict) -> str:
    """The filter's card (Markdown): data, training, held-out accuracy, the command."""
    return CARD.format(**{
        **report, "model": cfg.model, "tasks": ", ".join(cfg.tasks)}, family=config.family, width=config.block_length,
        threshold=config.threshold, params=2 * config.block_length * (config.block_length + 1),
        prompt_format="problem text alone" if cfg.raw_prompts else "chat template", seed=cfg.seed,
        data_mb=report["data_bytes"] / 1e6, per_task=", ".join(f"{k} {v}" for k, v in report["prompts_per_task"].items()), task_flags=" ".join(f"--task {t}" for t in cfg.tasks))


__all__ = ["EGPReplay", "FilterTrainConfig", "fit", "replay_records", "train_filter"]

"""The trainer: builds a core of a given size in a family's layout, trains it with that family's objective on the
zoo tasks, and exports it in the family's checkpoint layout with a training record (steps, time, hardware,
loss curve). Seeded; runs on CPU (smoke tests) or CUDA (bf16 autocast).

    python -m dllm.train --family llada --tokenizer zoo/tokenizer --out zoo/tiny-llada --steps 6000
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from dllm.models.core import Transformer
from dllm.models.qwen import map_qwen_name
from dllm.models.spec import ArchConfig
from dllm.train import export
from dllm.train.data import ExampleSet
from dllm.train.objectives import OBJECTIVES

logger = logging.getLogger(__name__)

FAMILIES = ("llada", "dream", "sdar", "ar", "tidar")


@dataclass
class TrainConfig:
    family: str
    out: str
    tokenizer: str
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup: int = 200
    weight_decay: float = 0.01
    seq_len: int = 160
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 704
    block_size: int = 4              # SDAR's block; TiDAR's pre-draft block is draft_length + 1
    draft_length: int = 8            # TiDAR: drafts verified per step
    alpha: float = 1.0               # TiDAR: weight of the AR loss, L = (alpha L_AR + L_diff) / (1 + alpha)
    tasks: dict = field(default_factory=lambda: {"arith": 80000, "gsm-lite": 60000, "code-lite": 40000})
    init_from: str | None = None
    seed: int = 0
    device: str = "auto"
    log_every: int = 100
    max_seconds: float | None = None  # wall-clock budget: training ends at `steps` or here, the schedule follows

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if self.draft_length < 1 or self.alpha < 0:
            raise ValueError("draft_length must be >= 1 and alpha >= 0")

    @property
    def objective_options(self) -> dict:
        if self.family == "tidar":
            return {"block_size": self.draft_length + 1, "alpha": self.alpha}
        return {"block_size": self.block_size}


def arch_for(cfg: TrainConfig, vocab_size: int) -> ArchConfig:
    qwen = cfg.family != "llada"
    return ArchConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads if qwen else cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads,
        intermediate_size=cfg.intermediate_size, rope_theta=10000.0, rms_norm_eps=1e-6 if qwen else 1e-5,
        max_position_embeddings=max(512, cfg.seq_len), qkv_bias=cfg.family in ("dream", "ar", "tidar"),
        qk_norm=cfg.family == "sdar", rope_full_precision=not qwen, norm_weight_fp32=cfg.family == "sdar")


def special_ids(tokenizer) -> dict:
    from dllm.zoo.tokenizer import BOS, IM_END, MASK
    return {"eos": tokenizer.eos_token_id, "mask": tokenizer.convert_tokens_to_ids(MASK),
            "bos": tokenizer.convert_tokens_to_ids(BOS), "im_end": tokenizer.convert_tokens_to_ids(IM_END)}


def _init(model: Transformer, seed: int) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith("bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def _load_init(model: Transformer, path: str) -> None:
    """Initialise from a checkpoint: the same family's (to continue training) or one in the Qwen2 layout (Dream
    and TiDAR from the AR model, as Dream came from Qwen2.5 and TiDAR continues pretraining an AR model)."""
    from safetensors.torch import load_file
    from dllm.models.registry import adapter_for
    cfg = json.loads((pathlib.Path(path) / "config.json").read_text())
    rename = map_qwen_name if cfg.get("model_type") == "qwen2" else adapter_for(cfg).map_name
    state = {rename(k): v.float() for k, v in load_file(str(pathlib.Path(path) / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k}, strict=False)
    if missing or unexpected:
        raise ValueError(f"cannot initialise from {path}: missing {missing[:3]}, unexpected {unexpected[:3]}")


_EXAMPLES: dict = {}


def _examples(cfg: TrainConfig, tokenizer) -> ExampleSet:
    """The rendered training set, built once per process for all models that share tokenizer, tasks and length."""
    from dllm.zoo.tokenizer import IM_END
    key = (cfg.tokenizer, tuple(sorted(cfg.tasks.items())), cfg.seq_len, cfg.seed)
    if key not in _EXAMPLES:
        _EXAMPLES[key] = ExampleSet(tokenizer, cfg.tasks, cfg.seq_len, IM_END, cfg.seed)
    data = _EXAMPLES[key]
    data.rng.seed(cfg.seed)
    return data


def _progress(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Fraction of training done: by steps, or by the time budget when that runs out first."""
    done = step / cfg.steps
    if cfg.max_seconds:
        done = max(done, elapsed / cfg.max_seconds)
    return done


def _lr(cfg: TrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: TrainConfig) -> pathlib.Path:
    from dllm.zoo.tokenizer import load_tokenizer
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    tokenizer = load_tokenizer(cfg.tokenizer)
    ids = special_ids(tokenizer)
    vocab = -(-len(tokenizer) // 64) * 64
    arch = arch_for(cfg, vocab)
    model = Transformer(arch).to(device)
    _init(model, cfg.seed)
    if cfg.init_from:
        _load_init(model, cfg.init_from)
    data = _examples(cfg, tokenizer)
    objective = OBJECTIVES[cfg.family]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    losses, start = [], time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    step = 0
    while (progress := _progress(cfg, step, time.perf_counter() - start)) < 1.0:
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step, progress)
        batch = data.batch(cfg.batch_size, device)
        with autocast:
            loss = objective(model, batch, ids["mask"], **cfg.objective_options)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0:
            losses.append((step, loss.item()))
            logger.info("%s step %d loss %.4f (%.0f s)", cfg.family, step, losses[-1][1], time.perf_counter() - start)
        step += 1
    losses.append((step, loss.item()))
    cfg.steps = step  # the record says how many steps were actually taken
    seconds = time.perf_counter() - start
    return _save(cfg, model, arch, tokenizer, ids, losses, seconds, device, len(data.rows))


def _history(cfg: TrainConfig) -> list[dict]:
    """Earlier training stages of a model being continued (their records, loss curves left out)."""
    if not cfg.init_from:
        return []
    prev = pathlib.Path(cfg.init_from) / "training.json"
    if not prev.is_file():
        return []
    record = json.loads(prev.read_text())
    stages = record.pop("previous", [])
    record.pop("loss", None)
    return stages + [record]


def _save(cfg, model, arch, tokenizer, ids, losses, seconds, device, num_examples) -> pathlib.Path:
    previous = _history(cfg)
    eos_ids = [ids["im_end"], ids["eos"]]
    configs = {"llada": lambda: export.llada_config(arch, ids), "dream": lambda: export.dream_config(arch, ids),
               "sdar": lambda: export.sdar_config(arch, ids, cfg.block_size), "ar": lambda: export.ar_config(arch, ids),
               "tidar": lambda: export.tidar_config(arch, ids, cfg.draft_length, cfg.draft_length + 1)}
    gen = {"bos_token_id": ids["bos"], "eos_token_id": eos_ids, "pad_token_id": ids["eos"]}
    if cfg.family == "dream":
        gen.update(alg="entropy", eps=1e-3, temperature=0.0)
    model.eval()
    path = export.save_checkpoint(model, cfg.family, cfg.out, tokenizer, ids, configs[cfg.family](), gen)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    record = {"config": asdict(cfg), "parameters": sum(p.numel() for p in model.parameters()),
              "train_seconds": round(seconds, 1), "hardware": hardware, "torch": torch.__version__,
              "num_distinct_examples": num_examples, "previous": previous, "loss": losses}
    (path / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    _plot(losses, path / "loss.png", cfg.family)
    return path


def _plot(losses, path: pathlib.Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no loss curve written")
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"tiny-{title} training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

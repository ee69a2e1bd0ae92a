"""Accuracy of a model on the zoo tasks under named decoding settings, through the public API; used for the
model cards and by the tests that hold the zoo to its accuracy bar.

Settings (the same for every family, each family's reference sampler underneath):
  reference   one token a step (the family's own sampler; SDAR: static low-confidence, one token a step)
  aggressive  a fixed 32 tokens a step with no threshold (LLaDA: each 32-token block in one step; SDAR: blocks of 32
              decoded in one step each, eight of its native 4-token blocks at once)
  threshold   Fast-dLLM threshold decoding at 0.9
TiDAR models have settings of their own: `tidar` (TiDAR decoding) and `ar` (the same model decoded
autoregressively), both greedy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from dllm.sampling_params import SamplingParams

MAX_TOKENS = {"arith": 128, "gsm-lite": 128, "code-lite": 96}
SETTINGS = ("reference", "aggressive", "threshold")
FAMILY_SETTINGS = {"tidar": ("tidar", "ar")}   # families whose settings are strategies of their own


def _family(path: str) -> str:
    import json
    from dllm.models.loader import resolve_path
    return str(json.loads((resolve_path(path) / "config.json").read_text()).get("model_type", "")).lower()


@dataclass
class TaskResult:
    task: str
    setting: str
    accuracy: float
    num_problems: int
    tokens_per_forward: float
    seconds: float


def setting(llm, name: str, task: str) -> tuple[str, SamplingParams]:
    """(strategy, params) of a named setting for this model family and task."""
    g = MAX_TOKENS[task]
    family, block = llm.spec.family, llm.spec.native_block_size
    if name == "threshold":
        return "threshold", SamplingParams(max_tokens=g, threshold=0.9, temperature=0)
    per_step = 1 if name == "reference" else 32
    if family == "sdar":
        block = block if name == "reference" else 32
        steps = block if name == "reference" else 1
        return "reference", SamplingParams(max_tokens=g, block_length=block, steps=steps,
                                           remasking="low_confidence_static", temperature=0)
    extra = {"alg": "maskgit_plus"} if family == "dream" else {}
    return "reference", SamplingParams(max_tokens=g, steps=g // per_step, temperature=0, **extra)


def evaluate(path: str, tasks=("arith", "gsm-lite", "code-lite"), settings=None, num_problems: int = 200,
             device: str = "auto", batch_size: int = 256) -> list[TaskResult]:
    from dllm.api import LLM
    from dllm.eval.tasks import get_task
    from dllm.eval.tasks.chat import to_messages
    llms: dict[str, LLM] = {}
    results = []
    own = FAMILY_SETTINGS.get(_family(path))
    settings = settings or own or SETTINGS
    if own:   # `reference` of a family with settings of its own: its own decoding (TiDAR: `tidar`)
        settings = tuple(own[0] if s == "reference" else s for s in settings)
    for task_name in tasks:
        task = get_task(task_name)
        problems = task.generate("test", num_problems)
        for name in settings:
            if own:
                strategy, params = name, SamplingParams(max_tokens=MAX_TOKENS[task_name], temperature=0)
            else:
                probe = llms.get("reference") or LLM(path, strategy="reference", cache="none", device=device,
                                                     max_batch_size=batch_size)
                llms.setdefault("reference", probe)
                strategy, params = setting(probe, name, task_name)
            if strategy not in llms:
                # no cache: the cards' settings are the strategies alone (not the defaults of dllm/defaults.py)
                llms[strategy] = LLM(path, strategy=strategy, cache="none", device=device, max_batch_size=batch_size)
            start = time.perf_counter()
            outs = llms[strategy].chat([to_messages(p) for p in problems], params)
            seconds = time.perf_counter() - start
            correct = sum(task.check(p, o.text) for p, o in zip(problems, outs))
            tpf = sum(o.metrics.num_tokens for o in outs) / max(1, sum(o.metrics.nfe for o in outs))
            results.append(TaskResult(task_name, name, correct / len(problems), len(problems), round(tpf, 2),
                                      round(seconds, 1)))
    return results


def evaluate_ar(path: str, tasks=("arith", "gsm-lite", "code-lite"), num_problems: int = 200, device: str = "auto",
                batch_size: int = 256) -> list[TaskResult]:
    """Greedy accuracy of a causal LM (tiny-ar) through `transformers.AutoModelForCausalLM.generate`, the
    autoregressive baseline of the diffusion models (one token per forward by construction)."""
    import torch
    from transformers import AutoModelForCausalLM
    from dllm.zoo.tokenizer import load_tokenizer
    from dllm.zoo import bundled_path
    from dllm.eval.tasks import get_task
    from dllm.eval.tasks.chat import to_messages
    path = str(bundled_path(path) or path)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    tok = load_tokenizer(path)  # not AutoTokenizer: see dllm/zoo/tokenizer.py
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if dev == "cpu" else torch.bfloat16).to(dev)
    model.eval()
    results = []
    for task_name in tasks:
        task = get_task(task_name)
        problems = task.generate("test", num_problems)
        prompts = [tok.apply_chat_template(to_messages(p), tokenize=False, add_generation_prompt=True) for p in problems]
        start, texts, tokens = time.perf_counter(), [], 0
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=MAX_TOKENS[task_name], do_sample=False)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                stop = [j for j, t in enumerate(row) if t in model.generation_config.eos_token_id]
                row = row[:stop[0] + 1] if stop else row
                tokens += len(row)
                texts.append(tok.decode(row, skip_special_tokens=True))
        seconds = time.perf_counter() - start
        correct = sum(task.check(p, t) for p, t in zip(problems, texts))
        results.append(TaskResult(task_name, "greedy", correct / len(problems), len(problems), 1.0, round(seconds, 1)))
    return results


def table(results: list[TaskResult]) -> str:
    lines = ["| task | setting | accuracy | problems | tokens per forward | seconds |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.task} | {r.setting} | {100 * r.accuracy:.1f}% | {r.num_problems} | "
                     f"{r.tokens_per_forward} | {r.seconds} |")
    return "\n".join(lines)

"""dllm as an lm-evaluation-harness model named "dllm": `generate_until` tasks (gsm8k, ...) decode through dllm's
engine with its caches and strategies.

    python -m dllm.eval.lm_eval_model --model dllm --tasks gsm8k --batch_size 32 \\
        --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,cache=dual,strategy=threshold,threshold=0.9,max_tokens=256

lm-eval 0.4.x resolves `--model` against its own registry only (its CLI imports `lm_eval.models`, never an
outside package), so `python -m dllm.eval.lm_eval_model` registers "dllm" and then runs lm-eval's own command line
with the same arguments. From Python, `import dllm.eval.lm_eval_model` registers it for `lm_eval.simple_evaluate(
model="dllm", ...)`. (Plain `lm_eval --model dllm` needs entry-point discovery in lm-eval itself, which no
0.4.x release has.)

`--model_args`: `pretrained` (a checkpoint directory, zoo model or hub id; default tiny-llada), `cache`,
`strategy`, `dtype`, `revision`, `trust_remote_code`, and any `SamplingParams` field (`max_tokens`,
`block_length`, `steps`, `threshold`, `temperature`, ...). Per request, the task's `until` strings cut the text
(decoding is not steered by them); `max_gen_toks` is the generation length unless `max_tokens` is given (a
`block_length` that does not divide it rounds the canvas up and the output is cut back to `max_gen_toks`
tokens); the task's `temperature` applies when `do_sample` is not false, unless `temperature` is given.
Other generation kwargs are ignored (logged once). The device and batch size are lm-eval's own `--device` and
`--batch_size` (its CLI passes `cuda:0` by default; without a GPU the model runs on the CPU, as lm-eval's HF
model does). `loglikelihood` tasks are refused: a diffusion LM has no
left-to-right likelihood, and LLaDA's Monte-Carlo estimate is not implemented.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
from lm_eval.api.model import LM
from tqdm import tqdm

from dllm.defaults import AUTO
from dllm.errors import InvalidParameterError
from dllm.sampling_params import SamplingParams
from dllm.zoo import DEFAULT_MODEL
from dllm.eval.runner import truncate

logger = logging.getLogger(__name__)
_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_READ_GEN_KWARGS = {"until", "max_gen_toks", "temperature", "do_sample"}
NOT_SUPPORTED = ("dllm's lm-eval model implements generate_until only (e.g. gsm8k, humaneval); {} tasks "
                 "(multiple choice, perplexity) need a likelihood, which a diffusion LM does not give "
                 "left to right (LLaDA's Monte-Carlo estimate is not implemented)")


class DllmLM(LM):
    """An lm-eval `LM` over `dllm.LLM`; see the module docstring for the arguments."""

    def __init__(self, pretrained: str = DEFAULT_MODEL, cache: str | None = AUTO, strategy: str = AUTO,
                 dtype: str | None = "auto", device: str | None = "auto", revision: str | None = None,
                 trust_remote_code: bool = False, batch_size: int | str = 32, max_batch_size: int | None = None,
                 **sampling):
        super().__init__()
        from dllm.api import LLM
        unknown = sorted(set(sampling) - _FIELDS)
        if unknown:
            raise InvalidParameterError(f"unknown dllm model_args {', '.join(unknown)}; use pretrained, cache, strategy, "
                                        "dtype, device, revision, trust_remote_code or a SamplingParams field")
        self.sampling = SamplingParams(**sampling)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device cuda:0 unless told otherwise; its HF model falls back the same way
            logger.warning("no CUDA device: dllm runs on the CPU (lm-eval passed device=%s)", device)
            device = "cpu"
        self.batch_size = _batch_size(batch_size, max_batch_size)
        # lm-eval reads the value `none` as None; "auto" resolves per family (dllm/defaults.py)
        self.llm = LLM(str(pretrained), cache=cache or "none", strategy=strategy, dtype=dtype or "auto",
                       device=device or "auto", revision=revision, trust_remote_code=trust_remote_code,
                       max_batch_size=self.batch_size)
        self.stats = {"requests": 0, "tokens": 0, "nfe": 0, "generation_seconds": 0.0}
        self._ignored: set[str] = set()
        self.chat_templated = False

    @property
    def tokenizer_name(self) -> str:
        return str(self.llm.loaded.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.llm.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """Called by lm-eval while it builds the contexts when --apply_chat_template is on (for every request)."""
        self.chat_templated = True
        return self.llm.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(NOT_SUPPORTED.format("loglikelihood"))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(NOT_SUPPORTED.format("loglikelihood_rolling"))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Longest prompts first (less padding per batch), answers returned in request order."""
        args = [r.args for r in requests]
        order = sorted(range(len(args)), key=lambda i: -len(args[i][0]))
        results: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), desc="dllm generate_until", disable=disable_tqdm)
        for i in range(0, len(order), self.batch_size):
            chunk = order[i:i + self.batch_size]
            for j, text in zip(chunk, self._generate([args[j] for j in chunk])):
                results[j] = text
                self.cache_hook.add_partial("generate_until", args[j], text)
            bar.update(len(chunk))
        bar.close()
        return results

    def _generate(self, batch: list[tuple[str, dict]]) -> list[str]:
        prompts = [self._prompt(context) for context, _ in batch]
        requested = [self._params(kwargs) for _, kwargs in batch]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, [params for params, _ in requested])
        self.stats["generation_seconds"] += time.perf_counter() - start
        texts = []
        for out, (_, limit), (_, kwargs) in zip(outputs, requested, batch):
            self.stats["requests"] += 1
            self.stats["tokens"] += out.metrics.num_tokens
            self.stats["nfe"] += out.metrics.nfe
            text = out.text
            if len(out.token_ids) > limit:  # the canvas was rounded up to whole blocks
                text = self.llm.tokenizer.decode(out.token_ids[:limit], skip_special_tokens=True)
            until = kwargs.get("until") or []
            texts.append(truncate(text, [until] if isinstance(until, str) else list(until))[0])
        return texts

    def _prompt(self, context: str) -> dict:
        """Token ids of `context`: a chat-templated context is tokenized as it is (the template holds whatever
        special tokens the checkpoint wants, as `LLM.chat` does), a plain one with the tokenizer's (BOS)."""
        ids = self.llm.tokenizer.encode(context, add_special_tokens=not self.chat_templated)
        return {"prompt": context, "prompt_token_ids": ids}

    def _params(self, kwargs: dict) -> tuple[SamplingParams, int]:
        """SamplingParams of one request, and the number of tokens its text may have."""
        for key in set(kwargs) - _READ_GEN_KWARGS - self._ignored:
            logger.warning("dllm ignores the generation kwarg %r (set decoding options in --model_args)", key)
            self._ignored.add(key)
        p = self.sampling
        limit = p.max_tokens or int(kwargs.get("max_gen_toks") or self.llm.spec.defaults.get("max_tokens", 128))
        max_tokens = p.max_tokens or (math.ceil(limit / p.block_length) * p.block_length if p.block_length else limit)
        temperature = p.temperature
        if temperature is None:
            temperature = 0.0 if kwargs.get("do_sample") is False else float(kwargs.get("temperature") or 0.0)
        return dataclasses.replace(p, max_tokens=max_tokens, temperature=temperature), limit

    def get_model_info(self) -> dict:
        """Added to lm-eval's results["config"]: the dllm setting and the speed of the generations so far."""
        s = self.stats
        return {"dllm_cache": self.llm.engine.cache_name, "dllm_strategy": self.llm.engine.strategy_name,
                "dllm_sampling": {k: v for k, v in dataclasses.asdict(self.sampling).items()
                                  if v != getattr(SamplingParams(), k)},
                "dllm_requests": s["requests"], "dllm_tokens": s["tokens"], "dllm_nfe": s["nfe"],
                "dllm_throughput": s["tokens"] / s["generation_seconds"] if s["generation_seconds"] else None}


def _batch_size(batch_size, max_batch_size) -> int:
    """lm-eval passes an int, a digit string, or 'auto' / 'auto:N' (then max_batch_size, else 32)."""
    text = str(batch_size)
    if text.startswith("auto"):
        return int(max_batch_size or 32)
    if not text.isdigit() or int(text) < 1:
        raise InvalidParameterError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return int(text)


def register() -> None:
    """Make "dllm" an lm-eval model name (registering the same class again is a no-op)."""
    from lm_eval.api.registry import register_model
    register_model("dllm")(DllmLM)


def main() -> None:
    """`lm_eval`'s command line with "dllm" registered."""
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    import dllm.eval.lm_eval_model as module  # register the importable module's class, not this __main__ copy
    module.main()
else:
    register()

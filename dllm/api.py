"""The Python API, in vLLM's shape:

    llm = LLM("GSAI-ML/LLaDA-8B-Instruct", cache="dual", strategy="threshold")
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=64, threshold=0.9))
    print(out[0].text, out[0].metrics.tokens_per_second)
    for event in llm.stream("Tell me a story"): print(event.delta_text, end="")

Engine settings (model, dtype, device, cache, strategy) are fixed when the `LLM` is built; per-request
settings live in `SamplingParams`; checkpoint facts (mask id, stop ids, defaults) come from the checkpoint.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

from dllm.cache import cache_class
from dllm.decoding import check_strategy_name
from dllm.defaults import AUTO, resolve_cache, resolve_strategy
from dllm.engine import Engine, Request
from dllm.errors import InvalidParameterError, check_unicode
from dllm.models.loader import load_model
from dllm.parallel import start_tensor_parallel
from dllm.runner import ModelRunner
from dllm.scheduler import Scheduler
from dllm.outputs import RequestOutput, StreamEvent
from dllm.sampling_params import SamplingParams
from dllm.threads import configure_cpu_threads
from dllm.zoo import DEFAULT_MODEL

PromptType = str | list[int] | dict


class LLM:
    """A loaded diffusion LM with one cache policy and one decoding strategy. `model`: a checkpoint directory,
    a bundled zoo model (`tiny-llada`, the default, `tiny-dream`, `tiny-sdar`) or a hub id. `strategy` and
    `cache` "auto" are the family's measured defaults (`dllm/defaults.py`); `strategy="reference"` is the
    family's published sampler (with "auto", its exact cache)."""

    def __init__(self, model: str | Path = DEFAULT_MODEL, *, cache: str = AUTO, strategy: str = AUTO, dtype: str = "auto",
                 device: str = "auto", revision: str | None = None, trust_remote_code: bool = False,
                 max_batch_size: int = 32, load_format: str = "safetensors", skip_tokenizer_init: bool = False,
                 seed: int = 0, cache_options: dict | None = None, strategy_options: dict | None = None,
                 enforce_eager: bool = False, tensor_parallel_size: int = 1):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise InvalidParameterError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        _check_names(cache, strategy, cache_options)  # bad names fail before the (long) load
        load = dict(dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, load_format=load_format,
                    seed=seed)
        runner = None
        if tensor_parallel_size != 1:
            model, device, runner_args = start_tensor_parallel(model, tensor_parallel_size, device, load,
                                                               enforce_eager)
            load["tp"] = runner_args["tp"]
        self.loaded = load_model(model, device=device, skip_tokenizer_init=skip_tokenizer_init, **load)
        if tensor_parallel_size != 1:
            runner = ModelRunner(self.loaded.model, self.loaded.arch, enforce_eager=enforce_eager,
                                 group=runner_args["group"])
        family = self.loaded.spec.family
        strategy = resolve_strategy(strategy, family)
        cache = resolve_cache(cache, family, strategy)
        cache_class(cache).resolve_options(dict(cache_options or {}))
        if next(self.loaded.model.parameters()).device.type == "cpu":
            configure_cpu_threads()
        self.engine = Engine(self.loaded, cache=cache, strategy=strategy, cache_options=cache_options,
                             strategy_options=strategy_options, enforce_eager=enforce_eager, runner=runner)
        self.max_batch_size = max_batch_size
        self._ids = itertools.count()
        self.scheduler = Scheduler(max_num_seqs=max_batch_size)

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker ranks (if any); the LLM cannot decode afterwards. Also run at exit."""
        group = getattr(self.engine.runner, "group", None)
        if group is not None:
            group.close()

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def spec(self):
        return self.loaded.spec

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for each prompt (text, token ids, or {"prompt_token_ids": [...]}); outputs keep prompt order."""
        requests = self._requests(_as_list(prompts), sampling_params)
        outputs: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(requests), desc="requests", disable=not use_tqdm)
        for event in self._run(requests, stream=False):
            if event.output is not None:
                outputs[event.request_id] = event.output
                bar.update(1)
        bar.close()
        return [outputs[r.request_id] for r in requests]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, formatted by the checkpoint's chat template."""
        return self.generate(self._chat_prompts(messages), sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompts: PromptType | Sequence[PromptType],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[StreamEvent]:
        """Yield text as it becomes final (left to right, typically a block at a time); the event that finishes a
        request carries its `RequestOutput`."""
        yield from self._run(self._requests(_as_list(prompts), sampling_params))

    def stream_chat(self, messages: list[dict] | list[list[dict]],
                    sampling_params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        yield from self.stream(self._chat_prompts(messages), sampling_params)

    # ------------------------------------------------------------------ step by step (vLLM's LLMEngine)

    def add_request(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue one prompt on the step scheduler and return its request id; `step()` decodes. Requests added
        while others decode start at the next step (in free slots, `max_batch_size` rows at once), each with its
        own settings; see dllm/scheduler.py. `prompt` may also be a conversation (a list of messages), formatted
        by the chat template."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            prompt = self._chat_prompts(prompt)[0]
        request = self._request(prompt, sampling_params or SamplingParams())
        if request_id is not None:
            request_id = str(request_id)
            if self.scheduler.has(request_id):
                raise InvalidParameterError(f"request id {request_id!r} is already queued or decoding; use a new id")
            request.request_id = request_id
        self.scheduler.add(self.engine, request)
        return request.request_id

    def step(self) -> list[StreamEvent]:
        """One scheduler step: admit waiting requests, one forward per running cohort; the text that became
        final in it (`StreamEvent`s; a request's last event carries its `RequestOutput`)."""
        return self.scheduler.step()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort_request(self, request_id: str) -> bool:
        """Cancel a queued or decoding request (its slot is free at the next step); False if it was not there."""
        return self.scheduler.abort(str(request_id))

    def check_prompt(self, prompt: PromptType | list[dict], sampling_params: SamplingParams | None = None) -> None:
        """Raise the error `generate` (or `chat`, for a list of messages) would raise for this prompt and these
        parameters, such as a prompt that with `max_tokens` exceeds the context; decode nothing."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            prompt = self._chat_prompts(prompt)[0]
        self._request(prompt, sampling_params or SamplingParams())

    def apply_chat_template(self, messages: list[dict]) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidParameterError("this checkpoint's tokenizer has no chat template; use generate() with a plain prompt")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise InvalidParameterError('messages must be a list of {"role": ..., "content": ...} dicts')
        for m in messages:
            for key in ("role", "content"):
                if isinstance(m[key], str):
                    check_unicode(f"messages {key}", m[key])
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own raise_exception(...) (roles out of order, ...): bad input
            if type(exc).__module__.split(".")[0] != "jinja2":
                raise
            raise InvalidParameterError(f"the checkpoint's chat template refused these messages: "
                                        f"{str(exc)[:200]!r}") from None

    def _chat_prompts(self, messages) -> list[dict]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conv in conversations:
            text = self.apply_chat_template(conv)
            ids = self.tokenizer.encode(text, add_special_tokens=False)  # the template already holds BOS
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return prompts

    def _requests(self, prompts: list, sampling_params) -> list[Request]:
        if not prompts:
            raise InvalidParameterError("no prompts given")
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidParameterError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one, or one per prompt")
        return [self._request(p, sp or SamplingParams()) for p, sp in zip(prompts, params)]

    def _request(self, prompt, params: SamplingParams) -> Request:
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        resolved = self.engine.resolve(params)
        text, ids = self._tokenize(prompt)
        request = Request(str(next(self._ids)), ids, resolved, text)
        self.engine.check_request(request)
        return request

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidParameterError("this LLM was built with skip_tokenizer_init=True; pass prompts as token ids")
        if not isinstance(text, str):
            raise InvalidParameterError(f"a text prompt must be a string, got {type(text).__name__}")
        if not text:  # it would tokenize to BOS alone: an answer to nothing
            raise InvalidParameterError("the prompt is empty; give some text (or token ids)")
        check_unicode("prompt", text)
        return self.tokenizer.encode(text)

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), _token_list(prompt["prompt_token_ids"], self.loaded.arch.vocab_size)
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self._encode(prompt["prompt"])
        if isinstance(prompt, (list, tuple)):
            return None, _token_list(prompt, self.loaded.arch.vocab_size)
        raise InvalidParameterError(f"a prompt must be a string, a list of token ids or a dict with 'prompt_token_ids', got {type(prompt).__name__}")

    def _run(self, requests: list[Request], stream: bool = True) -> Iterator[StreamEvent]:
        """Decode `requests` through a step scheduler of their own (`max_batch_size` slots): requests with the
        same settings share forwards, and as rows finish, the next prompts take their slots at the next step."""
        per_row = 2 if any(r.params.cfg_scale > 0 for r in requests) else 1   # guidance: two rows a prompt
        scheduler = Scheduler(max_num_seqs=min(self.max_batch_size, len(requests)) * per_row, stream=stream)
        for r in requests:
            scheduler.add(self.engine, r)
        try:
            while scheduler.has_unfinished():
                yield from scheduler.step()
        finally:
            scheduler.close()


def _check_names(cache: str, strategy: str, cache_options: dict | None) -> None:
    if cache != AUTO:
        cache_class(cache).resolve_options(dict(cache_options or {}))
    if strategy != AUTO:
        check_strategy_name(strategy)


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt given as token ids
    if isinstance(prompts, Iterable):
        return list(prompts)
    raise InvalidParameterError(f"prompts must be a string, token ids, or a list of them, got {type(prompts).__name__}")


def _token_list(ids, vocab_size: int) -> list[int]:
    ids = list(ids)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise InvalidParameterError(f"prompt token ids must be integers in [0, {vocab_size})")
    return ids

"""What chat and completions share: the model-name check, prompts and request fields turned into engine
requests (validated against the checkpoint, with 400 / 404 / 413 answers), the engine events folded into
choices, and `usage`.

`max_tokens` that `block_length` does not divide: the engine decodes a canvas of the next multiple of
`block_length` and each choice is cut to `max_tokens` tokens (see `choice.py`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import AsyncIterator, Callable

from pydantic import BaseModel

from dllm.engine import Engine, Request
from dllm.errors import DllmError
from dllm.sampling_params import MAX_SEED
from dllm.server.choice import ChoiceText
from dllm.server.engine_client import EngineClient, RequestHandle
from dllm.server.errors import ApiError
from dllm.server.protocol import DllmOptions, UsageInfo

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]


@dataclass
class Generation:
    """One HTTP request as engine requests: choice `p * n + j` is choice j of prompt p."""

    id: str
    model: str
    prompts: list[Prompt]
    choices: list[ChoiceText]
    requests: list[tuple[Engine, Request]]
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> UsageInfo:
        prompt = sum(len(p.token_ids) for p in self.prompts)
        completion = sum(c.num_tokens for c in self.choices)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@dataclass
class SseStream:
    """A server-sent-events body (`data: {...}` lines ending in `data: [DONE]`) and how to end it early."""

    lines: AsyncIterator[str]
    cancel: Callable[[], None]


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json(exclude_none=True) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    """Turns validated request bodies into `Generation`s on an `EngineClient` and reads their events."""

    def __init__(self, client: EngineClient, served_model_names: list[str]):
        self.client, self.served_model_names = client, served_model_names
        self.llm = client.llm

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def model_name(self, requested: str | None) -> str:
        if requested is None:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise ApiError(f"the model {requested!r} does not exist; this server serves "
                           f"{', '.join(map(repr, self.served_model_names))} (GET /v1/models)",
                           HTTPStatus.NOT_FOUND, param="model", code="model_not_found")
        return requested

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ApiError("this server loaded no tokenizer (--skip-tokenizer-init); send the prompt as token ids "
                           "to /v1/completions", param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def prepare(self, body: DllmOptions, prompts: list[Prompt], prefix: str, prompt_param: str) -> Generation:
        """Validate `body` against the model and build its engine requests (raises ApiError)."""
        model = self.model_name(body.model)
        body.unsupported_fields()
        if body.unknown_fields():  # escaped names: a request cannot forge log lines
            logger.warning("ignoring unknown request fields: %s", ", ".join(body.unknown_fields()))
        self.client.check_request_count(len(prompts) * body.n)
        try:
            return self._prepare(body, prompts, f"{prefix}-{uuid.uuid4().hex}", model, prompt_param)
        except DllmError as exc:
            raise ApiError(str(exc), param=_param_of(str(exc), body)) from None

    def _prepare(self, body: DllmOptions, prompts: list[Prompt], gen_id: str, model: str,
                 prompt_param: str) -> Generation:
        engine = self.client.engine(body.cache, body.strategy)
        requested, stops = body.requested_max_tokens(), body.stop_strings()
        canvas = _canvas_length(requested, body.block_length, engine.spec.attention == "full")
        choices, requests = [], []
        for p, prompt in enumerate(prompts):
            self._check_prompt(prompt, prompt_param)
            for j in range(body.n):
                # every choice gets a seed, so that a batch that fails can be decoded again, one request at a
                # time, to the same tokens (engine_client.py): when the request has none, a random one if it
                # samples, and 0 at temperature 0 (what the engine's unseeded draws at temperature 0 use, e.g.
                # s2d2's acceptance draws: the tokens `LLM.generate` gives)
                seed = None if body.seed is None else (body.seed + j) % (MAX_SEED + 1)
                params = engine.resolve(body.to_sampling_params(max_tokens=canvas, seed=seed))
                if params.seed is None:
                    params = dataclasses.replace(params, seed=secrets.randbelow(MAX_SEED + 1)
                                                 if params.temperature > 0 else 0)
                request = Request(f"{gen_id}-{p * body.n + j}", prompt.token_ids, params, prompt.text)
                self._check_context(request, requested, body.block_length if canvas != requested else None)
                engine.check_request(request)
                self.client.check_size(request)
                requests.append((engine, request))
                decode = _decoder(self.tokenizer, params.skip_special_tokens)
                choices.append(ChoiceText(len(choices), request.request_id, requested or params.max_tokens,
                                          stops, decode))
        return Generation(gen_id, model, prompts, choices, requests)

    def _check_prompt(self, prompt: Prompt, param: str) -> None:
        n, limit = len(prompt.token_ids), self.client.max_model_len
        if n == 0:
            raise ApiError("the prompt is empty; give at least one token of prompt", param=param)
        if n >= limit:
            raise ApiError(f"the prompt has {n} tokens and {self._context()} is {limit} tokens, leaving no room "
                           f"to generate; shorten the prompt", HTTPStatus.REQUEST_ENTITY_TOO_LARGE, param=param,
                           code="context_length_exceeded")

    def _check_context(self, request: Request, requested: int | None, rounding_block: int | None) -> None:
        """`rounding_block`: the block_length `requested` was rounded up to a multiple of, if it was."""
        n, limit, canvas = len(request.prompt_token_ids), self.client.max_model_len, request.params.max_tokens
        if n + canvas <= limit:
            return
        room, rounded = limit - n, ""
        if rounding_block:
            room = room // rounding_block * rounding_block
            rounded = f" (rounded up to {canvas}, a multiple of block_length)"
        raise ApiError(f"max_tokens {requested or canvas}{rounded} plus the prompt's {n} tokens exceeds "
                       f"{self._context()} of {limit} tokens; set max_tokens to at most {room}",
                       param="max_tokens", code="context_length_exceeded")

    def _context(self) -> str:
        if self.client.max_model_len < self.llm.spec.max_length:
            return "the server's --max-model-len"
        return "the model's context"

    def submit(self, generation: Generation) -> RequestHandle:
        return self.client.submit(generation.requests)

    async def events(self, generation: Generation, handle: RequestHandle) -> AsyncIterator[tuple[ChoiceText, str]]:
        """(choice, newly final text) for every event that gives a choice text or ends it."""
        by_id = {c.request_id: c for c in generation.choices}
        async for event in handle:
            choice = by_id[event.request_id]
            delta = choice.add(event)
            if choice.finished and event.output is None:
                # ended by max_tokens or a stop string: the rest is not needed
                handle.cancel(event.request_id, reason=choice.finish_reason)
            if delta or choice.finished:
                yield choice, delta

    async def respond(self, body, prompts: Callable[[], list[Prompt]], prefix: str, prompt_param: str,
                      stream: Callable, response: Callable[[Generation], BaseModel]):
        """The flow every endpoint shares: validate, submit, then an SSE stream or the whole response.
        Returns an `ApiError`, the response, or an `SseStream`; bad input never raises out of it."""
        try:
            self.model_name(body.model)
            generation = self.prepare(body, prompts(), prefix, prompt_param)
            handle = self.submit(generation)
        except ApiError as exc:
            return exc
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return SseStream(stream(generation, handle, usage), handle.cancel)
        try:
            await self.run_to_end(generation, handle)
        except ApiError as exc:
            return exc
        return response(generation)

    async def run_to_end(self, generation: Generation, handle: RequestHandle) -> None:
        try:
            async for _ in self.events(generation, handle):
                pass
        finally:
            handle.cancel()


def _canvas_length(requested: int | None, block_length: int | None, divisible: bool) -> int | None:
    if requested is None or block_length is None or block_length < 1 or not divisible:
        return requested
    return -(-requested // block_length) * block_length


def _decoder(tokenizer, skip_special_tokens: bool):
    if tokenizer is None:   # --skip-tokenizer-init: no text, only token ids and usage
        return lambda ids: ""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _param_of(message: str, body: DllmOptions) -> str | None:
    """The request field an error message starts with (`top_p must be ...`), when it names one."""
    words = message.split()
    word = (words[1] if words[0] == "unknown" and len(words) > 1 else words[0]).strip(":,'\"") if words else ""
    if word == "gen_length" or word.startswith("max_tokens"):
        return "max_tokens"
    return word if word in type(body).model_fields else None

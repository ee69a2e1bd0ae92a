"""Request and response models of the OpenAI API (chat completions, completions, models), in OpenAI's field
names and order, plus the dLLM extras a client sends as extra body fields (`extra_body=` in the `openai`
client). `to_sampling_params()` is the one place a request becomes `SamplingParams`.

Unknown fields are accepted and ignored (logged, names escaped), as OpenAI-compatible servers do, except OpenAI
fields that would change the result and that dllm cannot honour (penalties, logprobs, tools, ...): a request
setting one of those to anything but its no-op value is refused with 400.

Types are OpenAI's, strictly: an integer field takes a JSON integer (not `true`, not `"3"`, not `3.0`), a boolean
field `true`/`false` only, a number field a finite number (no NaN or Infinity), a text field a string of valid
Unicode (a lone surrogate such as "\\ud800" is refused, naming the field). Ranges that need no model are checked
here or by `SamplingParams`; the rest (context, vocabulary, steps) when the request is resolved against the model.
"""
from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import AfterValidator, AllowInfNan, BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt

from dllm.errors import check_unicode
from dllm.sampling_params import MAX_SEED, SamplingParams
from dllm.server.errors import ApiError

MAX_STOP_STRINGS = 16     # OpenAI takes 4
MAX_STOP_CHARS = 1000

# OpenAI fields dllm cannot honour, with the values that leave them off.
UNSUPPORTED_FIELDS = {
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none"), "function_call": (None, "none"), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
}


def _valid_unicode(text: str) -> str:
    check_unicode("the text", text)
    return text


Text = Annotated[str, Strict(), AfterValidator(_valid_unicode)]
Number = Annotated[float, Strict(), AllowInfNan(False)]  # an int or a finite float; never a bool or a string
Int = StrictInt
Bool = StrictBool


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class DllmOptions(OpenAIModel):
    """dLLM extras (not in OpenAI's API); see `SamplingParams` for what each one does."""

    top_k: Int | None = Field(None, ge=-1)
    steps: Int | None = Field(None, ge=1)
    block_length: Int | None = Field(None, ge=1)
    threshold: Number | None = None
    factor: Number | None = None
    remasking: Text | None = None
    alg: Text | None = None
    alg_temp: Number | None = None
    eps: Number | None = None
    entropy_bound: Number | None = None
    cfg_scale: Number | None = None
    logits_eos_inf: Bool = False
    confidence_eos_eot_inf: Bool = False
    ignore_eos: Bool = False
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: Bool = True
    strategy: Text | None = None
    """Decoding strategy of this request; default: the server's --strategy."""
    cache: Text | None = None
    """KV-cache policy of this request; default: the server's --cache."""
    return_token_ids: Bool = False
    """Non-streamed responses: add each choice's generated `token_ids`."""

    def unsupported_fields(self) -> None:
        for name, off in UNSUPPORTED_FIELDS.items():
            if name in (self.model_extra or {}) and self.model_extra[name] not in off:
                raise ApiError(f"{name} is not supported by dllm; leave it unset", param=name,
                               code="unsupported_parameter")

    def unknown_fields(self) -> list[str]:
        """The names of the fields dllm ignores, each escaped (repr): a name may hold newlines or anything."""
        return sorted(repr(name) for name in set(self.model_extra or {}) - set(UNSUPPORTED_FIELDS))

    def stop_strings(self) -> list[str]:
        stop = getattr(self, "stop", None)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise ApiError("stop strings must be non-empty", param="stop")
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters "
                           f"each (they are searched in the text on the server's event loop)", param="stop")
        return stops

    def requested_max_tokens(self) -> int | None:
        """`max_tokens`, or its newer OpenAI name `max_completion_tokens` (chat)."""
        alias = getattr(self, "max_completion_tokens", None)
        if alias is not None and self.max_tokens is not None and alias != self.max_tokens:
            raise ApiError("max_tokens and max_completion_tokens differ; set only one of them",
                           param="max_completion_tokens")
        value = alias if alias is not None else self.max_tokens
        if value is not None and value < 1:
            raise ApiError(f"max_tokens must be >= 1, got {value}", param="max_tokens")
        return value

    def to_sampling_params(self, *, max_tokens: int | None, seed: int | None) -> SamplingParams:
        """The request's SamplingParams with the canvas length `max_tokens` (the requested number rounded up
        to a multiple of block_length) and this choice's seed. Raises InvalidParameterError for bad values."""
        return SamplingParams(
            max_tokens=max_tokens, block_length=self.block_length, steps=self.steps, temperature=self.temperature,
            top_p=None if self.top_p == 1 else self.top_p,  # 1 and top_k 0/-1 are no-ops, as in OpenAI's API
            top_k=None if self.top_k in (0, -1) else self.top_k, remasking=self.remasking, alg=self.alg,
            alg_temp=self.alg_temp, eps=self.eps, entropy_bound=self.entropy_bound,
            cfg_scale=self.cfg_scale or 0.0, threshold=self.threshold, factor=self.factor,
            logits_eos_inf=self.logits_eos_inf, confidence_eos_eot_inf=self.confidence_eos_eot_inf, seed=seed,
            ignore_eos=self.ignore_eos, stop_token_ids=list(self.stop_token_ids or []),
            skip_special_tokens=self.skip_special_tokens)


class StreamOptions(OpenAIModel):
    include_usage: Bool = False


class ContentPart(OpenAIModel):
    type: Text
    text: Text | None = None


class ChatMessage(OpenAIModel):
    role: Text
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.type != "text" for part in self.content):
            raise ApiError("only text content parts are supported", param="messages")
        return "\n".join(part.text or "" for part in self.content)


Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]


class ChatCompletionRequest(DllmOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    model: Text | None = None
    max_completion_tokens: Int | None = None
    max_tokens: Int | None = None
    n: Int = Field(1, ge=1)
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    user: Text | None = None


class CompletionRequest(DllmOptions):
    model: Text | None = None
    prompt: Text | list[Text] | list[Int] | list[list[Int]]
    max_tokens: Int | None = None
    n: Int = Field(1, ge=1)
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    user: Text | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dllm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: str
    token_ids: list[int] | None = None  # extra: with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # extra: with return_token_ids (non-streamed)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None

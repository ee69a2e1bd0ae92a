"""POST /v1/completions: each prompt (a string, token ids, or a list of either) becomes one engine request
per choice (choice `p * n + j` is choice j of prompt p); the answer is a `CompletionResponse` or an SSE
stream of `text_completion` chunks (text as blocks become final, the last chunk of a choice with its
`finish_reason`, a usage chunk when `stream_options.include_usage`, then `data: [DONE]`).

`create()` returns an `ApiError`, a response or an `SseStream`; bad input never raises out of it.
"""
from __future__ import annotations

from dllm.server.engine_client import RequestHandle
from dllm.server.errors import ApiError
from dllm.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from dllm.server.serving_common import SSE_DONE, Generation, OpenAIServing, Prompt, SseStream, sse


class ServingCompletions:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def create(self, body: CompletionRequest) -> ApiError | CompletionResponse | SseStream:
        return await self.serving.respond(body, lambda: self._prompts(body.prompt), "cmpl", "prompt", self._stream,
                                          lambda g: self._response(g, body.return_token_ids))

    @staticmethod
    def _response(generation: Generation, return_token_ids: bool) -> CompletionResponse:
        choices = [CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason,
                                    token_ids=c.token_ids if return_token_ids else None)
                   for c in generation.choices]
        return CompletionResponse(id=generation.id, created=generation.created, model=generation.model,
                                  choices=choices, usage=generation.usage())

    def _prompts(self, prompt: str | list) -> list[Prompt]:
        if isinstance(prompt, str):
            return [Prompt(prompt, self.serving.encode(prompt))]
        if not prompt:
            raise ApiError("prompt is an empty list; give a string, token ids, or a list of them", param="prompt")
        if all(isinstance(t, int) for t in prompt):
            return [self._token_prompt(prompt)]
        if len(prompt) > self.serving.client.max_queue_size:
            raise ApiError(f"{len(prompt)} prompts are more than the server's --max-queue-size "
                           f"{self.serving.client.max_queue_size}; send fewer prompts per request", param="prompt")
        if all(isinstance(t, str) for t in prompt):
            return [Prompt(text, self.serving.encode(text)) for text in prompt]
        return [self._token_prompt(ids) for ids in prompt]

    def _token_prompt(self, ids: list[int]) -> Prompt:
        vocab = self.serving.llm.loaded.arch.vocab_size
        if not all(0 <= t < vocab for t in ids):
            raise ApiError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        return Prompt(None, list(ids))

    async def _stream(self, g: Generation, handle: RequestHandle, include_usage: bool):
        try:
            async for choice, delta in self.serving.events(g, handle):
                choices = [CompletionChoice(index=choice.index, text=delta, finish_reason=choice.finish_reason)]
                yield sse(CompletionResponse(id=g.id, created=g.created, model=g.model, choices=choices))
            if include_usage:
                yield sse(CompletionResponse(id=g.id, created=g.created, model=g.model, choices=[], usage=g.usage()))
        except ApiError as exc:
            yield sse(exc.body())
        finally:
            handle.cancel()
        yield SSE_DONE

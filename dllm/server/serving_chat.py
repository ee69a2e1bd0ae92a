"""POST /v1/chat/completions: messages, formatted by the checkpoint's chat template, become one engine
request per choice; the answer is a `ChatCompletionResponse` or an SSE stream of `ChatCompletionChunk`s (a
role chunk per choice, then text as blocks become final, the last chunk of a choice with its
`finish_reason`, a usage chunk when `stream_options.include_usage`, then `data: [DONE]`).

`create()` returns an `ApiError`, a response or an `SseStream`; bad input never raises out of it.
"""
from __future__ import annotations

from dllm.errors import DllmError
from dllm.server.engine_client import RequestHandle
from dllm.server.errors import ApiError
from dllm.server.protocol import (ChatCompletionChoice, ChatCompletionChunk, ChatCompletionRequest,
                                  ChatCompletionResponse, ChatCompletionStreamChoice, ChatResponseMessage,
                                  DeltaMessage)
from dllm.server.serving_common import SSE_DONE, Generation, OpenAIServing, Prompt, SseStream, sse


class ServingChat:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def create(self, body: ChatCompletionRequest) -> ApiError | ChatCompletionResponse | SseStream:
        return await self.serving.respond(body, lambda: [self._prompt(body)], "chatcmpl", "messages", self._stream,
                                          lambda g: self._response(g, body.return_token_ids))

    def _prompt(self, body: ChatCompletionRequest) -> Prompt:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.serving.llm.apply_chat_template(messages)
        except DllmError as exc:
            raise ApiError(str(exc), param="messages") from None
        return Prompt(text, self.serving.encode(text, add_special_tokens=False))  # the template holds the BOS

    def _response(self, g: Generation, with_token_ids: bool) -> ChatCompletionResponse:
        choices = [ChatCompletionChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                                        finish_reason=c.finish_reason,
                                        token_ids=c.token_ids if with_token_ids else None)
                   for c in g.choices]
        return ChatCompletionResponse(id=g.id, created=g.created, model=g.model, choices=choices, usage=g.usage())

    async def _stream(self, g: Generation, handle: RequestHandle, include_usage: bool):
        try:
            for choice in g.choices:
                yield sse(self._chunk(g, choice.index, DeltaMessage(role="assistant", content="")))
            async for choice, delta in self.serving.events(g, handle):
                yield sse(self._chunk(g, choice.index, DeltaMessage(content=delta or None), choice.finish_reason))
            if include_usage:
                yield sse(ChatCompletionChunk(id=g.id, created=g.created, model=g.model, choices=[], usage=g.usage()))
        except ApiError as exc:
            yield sse(exc.body())
        finally:
            handle.cancel()
        yield SSE_DONE

    @staticmethod
    def _chunk(g: Generation, index: int, delta: DeltaMessage, finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=g.id, created=g.created, model=g.model, choices=[choice])

"""One choice's text as the client sees it: the engine's committed text (final, left to right), cut at
`max_tokens` and at the first stop string, handed out as deltas.

Streamed and non-streamed responses both fold the same engine events through `ChoiceText`, so the joined
stream equals the non-streamed text, and `usage` agrees, by construction. Rules:
- the engine decodes a canvas of `max_tokens` rounded up to a multiple of `block_length`; once `max_tokens`
  tokens are final the choice ends with "length" and its text is the decoding of exactly those tokens;
- a stop string ends the choice with "stop" as soon as it appears in the final text; the text before it is
  kept. While stop strings are set, the last (longest stop - 1) characters are held back until they are
  known not to start one. Decoding is not cut short inside the engine: the request's row may go on in its
  batch, its events discarded; `num_tokens` counts the tokens final when the choice ended.
"""
from __future__ import annotations

from typing import Callable

from dllm.outputs import StreamEvent


class ChoiceText:
    def __init__(self, index: int, request_id: str, max_tokens: int, stops: list[str],
                 decode: Callable[[list[int]], str]):
        self.index, self.request_id, self.max_tokens, self.stops, self.decode = (
            index, request_id, max_tokens, stops, decode)
        self.token_ids: list[int] = []
        self.raw = ""    # the engine's final text so far
        self.sent = ""   # what has been handed out; the whole text once finished
        self.finish_reason: str | None = None
        self._hold = max((len(s) for s in stops), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.sent

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def add(self, event: StreamEvent) -> str:
        """Fold in one engine event of this choice; return the text that became final for the client."""
        if self.finished:
            return ""
        self.token_ids += event.delta_token_ids
        self.raw += event.delta_text
        reason = event.output.finish_reason if event.output is not None else None
        if len(self.token_ids) > self.max_tokens or (len(self.token_ids) == self.max_tokens and reason is None):
            self.token_ids = self.token_ids[:self.max_tokens]
            self.raw, reason = self.decode(self.token_ids), "length"
        cut = self._first_stop()
        if cut is not None:
            self.raw, reason = self.raw[:cut], "stop"
        if reason is not None:
            self.finish_reason = reason
            return self._send(self.raw)
        return self._send(self.raw[:len(self.raw) - self._hold])

    def _first_stop(self) -> int | None:
        hits = [i for i in (self.raw.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _send(self, upto: str) -> str:
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""
        delta = upto[len(self.sent):]
        self.sent = upto
        return delta

"""Typed results: `RequestOutput` (vLLM's shape: `.outputs[i].text / token_ids / finish_reason`) with per-request
metrics, and `StreamEvent`, the newly final text of one row after a denoising step."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Counts for one request. `num_tokens` counts generated tokens up to and including the first stop token
    (no prompt, no padding); `tokens_per_second` = num_tokens / latency_s; `nfe` counts model forwards while
    the row was in the batch (a CFG forward counts once); `tokens_per_forward` = num_tokens / nfe;
    `kv_computations` counts the token x layer key/value computations the row's forwards actually made (what a
    KV cache saves, independent of hardware), `kv_fraction` = that / (nfe x canvas length x layers), the
    uncached count (1.0 without a cache); `cache_stats` holds what a policy reports beyond that (Elastic-Cache:
    `layers_recomputed_fraction`, the fraction of layers its paper reports); `num_remasked` counts committed
    tokens a remasking strategy (Saber) turned back into MASK; `strategy_stats` holds what a strategy reports
    beyond that (S2D2: `verify_calls`, `accepted_tokens`, `accepted_per_verify`, router decisions)."""

    nfe: int
    num_tokens: int
    latency_s: float
    kv_computations: int = 0
    kv_fraction: float = 0.0
    kv_computations_per_step: list[int] = field(default_factory=list)   # the same count, one entry per forward
    cache_stats: dict = field(default_factory=dict)   # the cache policy's own per-request statistics
    tokens_per_forward: float = 0.0
    tokens_per_second: float = 0.0
    num_remasked: int = 0
    strategy_stats: dict = field(default_factory=dict)   # the strategy's own counts (S2D2: verify calls, ...)

    def __post_init__(self) -> None:
        self.tokens_per_forward = self.num_tokens / self.nfe if self.nfe else 0.0
        self.tokens_per_second = self.num_tokens / self.latency_s if self.latency_s > 0 else 0.0


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token was generated) | "length" (the canvas was filled)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: RequestMetrics
    finished: bool = True

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


@dataclass
class StreamEvent:
    """Text of `request_id` that became final (left-to-right committed) during the last step."""

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    block_index: int
    num_blocks: int
    output: RequestOutput | None = field(default=None)  # set on the event that finishes the request

    @property
    def finished(self) -> bool:
        return self.output is not None

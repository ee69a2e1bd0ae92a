"""Per-request decoding settings, validated on construction (vLLM's `SamplingParams` shape).

Fields left as None take the checkpoint's default (`ModelSpec.defaults`, filled from the family adapter and
`generation_config.json`) when the request is resolved against a model; `resolve()` also checks what can only
be checked then (divisibility, context length).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from dllm.errors import InvalidParameterError

REMASKING = ("low_confidence", "random",                                     # LLaDA
             "sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded")  # SDAR
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")

# Bounds every request is held to (the server answers 400 outside them). Floats must also be finite.
MAX_SEED = 2**63 - 1              # torch.Generator.manual_seed takes a signed 64-bit seed
MIN_TEMPERATURE = 0.01            # below it, logits / T overflows (vLLM clamps to the same 0.01)
MAX_TEMPERATURE = 100.0           # far past the point where sampling is uniform
MAX_CFG_SCALE = 100.0
MAX_FACTOR = 1e6
MAX_ENTROPY_BOUND = 1e6
MAX_STOP_TOKEN_IDS = 1024
MAX_TOKEN_ID = 2**31 - 1          # the engine checks ids against the model's vocabulary


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    """Generation length (LLaDA's `gen_length`): the number of MASK positions appended to the prompt. A row
    stops earlier once a stop token is final. Default: the checkpoint's (128 for LLaDA)."""

    block_length: int | None = None
    """Semi-autoregressive block size: blocks are decoded left to right; must divide `max_tokens`.
    Default: the checkpoint's (32 for LLaDA), or `max_tokens` when that default does not divide it."""

    steps: int | None = None
    """Denoising steps of the `reference` strategy, as each family's authors count them: LLaDA and Dream, steps
    over the whole generation (split evenly across blocks; a multiple of the number of blocks); SDAR, steps per
    block (`denoising_steps`). Default: one token a step. Threshold and factor strategies decide their own."""

    temperature: float | None = None
    """Sampling temperature; 0 = greedy. Default: the checkpoint's generation_config.json, else 0."""

    top_p: float | None = None
    """Nucleus sampling (Dream and SDAR samplers): keep the smallest set of tokens with probability >= top_p."""

    top_k: int | None = None
    """Top-k sampling (Dream and SDAR samplers): keep the k most probable tokens; 0 or None = off."""

    remasking: str | None = None
    """Which masked positions a step commits. LLaDA: `low_confidence` (most probable first, default) or `random`.
    SDAR: `low_confidence_dynamic` (default: every position above `threshold`, at least the step's quota),
    `low_confidence_static` (the quota, most confident first), `sequential` (the quota, left to right),
    `entropy_bounded` (EB-Sampler: the largest set whose entropy sum minus its maximum is <= `entropy_bound`)."""

    alg: str | None = None
    """Dream's position rule: `origin` (random positions), `maskgit_plus` (top probability), `topk_margin`
    (top-1 minus top-2 probability), `entropy` (lowest entropy). Default: the checkpoint's generation_config."""

    alg_temp: float | None = None
    """Dream: when > 0, positions are drawn from softmax(confidence / alg_temp) instead of taken top-k."""

    eps: float | None = None
    """Dream: the final time of the linear schedule t = 1 -> eps. Default: generation_config's, else 1e-3."""

    entropy_bound: float | None = None
    """SDAR `entropy_bounded` remasking: the entropy budget gamma. Default 0.35."""

    cfg_scale: float = 0.0
    """Unsupervised classifier-free guidance: logits = u + (cfg_scale + 1) (c - u), where u comes from the
    canvas with the prompt masked. Doubles the batch of every forward. 0 = off."""

    threshold: float | None = None
    """`threshold` strategy (Fast-dLLM): commit every masked position of the block whose confidence is at least
    this (and always the most confident one); default 0.9. SDAR `low_confidence_dynamic`: the confidence a
    position must exceed; default 0.85."""

    factor: float | None = None
    """`factor` strategy (Fast-dLLM): commit the top n positions with (n + 1)(1 - c_n) < factor. Default 1.0."""

    logits_eos_inf: bool = False
    """Never sample the EOS token (LLaDA Appendix B.4; used for code tasks with long canvases)."""

    confidence_eos_eot_inf: bool = False
    """Give EOS and end-of-turn predictions zero confidence so they are committed last (LLaDA Appendix B.4)."""

    seed: int | None = None
    """Seed of this request's own random generator: same seed, same output, whatever shares the batch."""

    ignore_eos: bool = False
    """Keep decoding past the checkpoint's stop tokens (the canvas is filled to `max_tokens`); `stop_token_ids`
    still stop."""

    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end generation, on top of the checkpoint's stop ids."""

    skip_special_tokens: bool = True
    """Drop special tokens from the returned text."""

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("block_length", self.block_length, minimum=1)
        _check_int("steps", self.steps, minimum=1)
        _check_temperature("temperature", self.temperature)
        _check_temperature("alg_temp", self.alg_temp)
        if self.eps is not None:
            _check_float("eps", self.eps, low=0.0, high=1.0)
            if self.eps >= 1.0:
                raise InvalidParameterError(f"eps must be in [0, 1), got {self.eps}")
        if self.entropy_bound is not None:
            _check_float("entropy_bound", self.entropy_bound, low=0.0, high=MAX_ENTROPY_BOUND)
        _check_float("cfg_scale", self.cfg_scale, low=0.0, high=MAX_CFG_SCALE)
        _check_int("top_k", self.top_k, minimum=0)
        if self.top_p is not None:
            _check_float("top_p", self.top_p, low=0.0, high=1.0, open_low=True)
        for name, allowed in (("remasking", REMASKING), ("alg", DREAM_ALGS)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise InvalidParameterError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.threshold is not None:
            _check_float("threshold", self.threshold, low=0.0, high=1.0, open_low=True)
        if self.factor is not None:
            _check_float("factor", self.factor, low=0.0, high=MAX_FACTOR, open_low=True)
        _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        for name in ("logits_eos_inf", "confidence_eos_eot_inf", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids):
            raise InvalidParameterError(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids "
                                        f"(non-negative integers), got {_short(self.stop_token_ids)}")

    def resolve(self, defaults: dict, steps_mode: str | None = "total", divisible: bool = True) -> "SamplingParams":
        """A copy with every None filled from `defaults` (the checkpoint's) and the arithmetic checked.

        `steps_mode`: "total" (steps over all blocks must split evenly), "per_block", or None (unused);
        `divisible`: whether max_tokens must be a multiple of block_length (full-attention canvases)."""
        max_tokens = self.max_tokens or defaults.get("max_tokens", 128)
        block = self.block_length
        if block is None:
            block = defaults.get("block_length", max_tokens)
            if divisible and (block > max_tokens or max_tokens % block):
                block = max_tokens
        if divisible and max_tokens % block:
            raise InvalidParameterError(
                f"max_tokens (gen_length) {max_tokens} is not divisible by block_length {block}; "
                f"choose a block_length that divides it, e.g. {_divisor_near(max_tokens, block)}")
        num_blocks = max_tokens // block
        per, most = ("block_length", block) if steps_mode == "per_block" else ("max_tokens", max_tokens)
        steps = self.steps or most
        # a step commits at least one token: more steps than positions only burn forwards (and time)
        if steps_mode is not None and steps > most:
            raise InvalidParameterError(f"steps {steps} exceeds {per} {most}: a step commits at least one token; "
                                        f"use steps <= {most}")
        if steps_mode == "total" and steps % num_blocks:
            raise InvalidParameterError(
                f"steps {steps} is not a multiple of the number of blocks {num_blocks} "
                f"(= max_tokens {max_tokens} / block_length {block}); use e.g. steps={max(num_blocks, steps // num_blocks * num_blocks)}")
        filled = {name: defaults.get(name) for name in _FROM_CHECKPOINT if getattr(self, name) is None}
        if filled.get("temperature") is None and self.temperature is None:
            filled["temperature"] = 0.0
        for name in ("temperature", "alg_temp"):  # a checkpoint's tiny temperature: vLLM's clamp, not an error
            if isinstance(filled.get(name), (int, float)) and 0 < filled[name] < MIN_TEMPERATURE:
                filled[name] = MIN_TEMPERATURE
        return dataclasses.replace(self, max_tokens=max_tokens, block_length=block, steps=steps, **filled)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one canvas and one decoding loop (they may differ in seed)."""
        fields = dataclasses.asdict(self)
        fields.pop("seed")
        fields.pop("skip_special_tokens")
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(fields.items()))


# Fields whose default, when the request leaves them None, is the checkpoint's (ModelSpec.defaults).
_FROM_CHECKPOINT = ("temperature", "top_p", "top_k", "remasking", "alg", "alg_temp", "eps")


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(f"{name} must be an integer, got {_short(value)}")
    if value < minimum:
        raise InvalidParameterError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidParameterError(f"{name} must be <= {maximum}, got {_short(value)}")


def _check_float(name: str, value, low: float, high: float, open_low: bool = False) -> None:
    """A finite number (int or float, not bool) in [low, high], or (low, high] with `open_low`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(f"{name} must be a number, got {_short(value)}")
    if not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be a finite number, got {value}")
    if not (low < value if open_low else low <= value) or value > high:
        raise InvalidParameterError(f"{name} must be in {'(' if open_low else '['}{low:g}, {high:g}], "
                                    f"got {_short(value)}")


def _check_temperature(name: str, value) -> None:
    """0 (greedy / off) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]: logits / T overflows for T near 0."""
    if value is None:
        return
    _check_float(name, value, low=0.0, high=MAX_TEMPERATURE)
    if 0 < value < MIN_TEMPERATURE:
        raise InvalidParameterError(f"{name} must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {value}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))

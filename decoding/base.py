"""The strategy interface: given the logits of the current block, which masked positions to commit, and to
which tokens.

Verbs (the engine calls nothing else):
  begin_block(masked)                       masked: [B, Lb] bool, the block's MASK positions at block start
  step(logits, masked, generators, first_only=False) -> (x0, commit) or StepEdits; commit only where masked
  select_rows(keep)                         rows left the batch
  max_forwards(block_length)                a bound on forwards per block (the engine's guard against a stall)

What a strategy declares (class attributes / methods with defaults):
  logits_span         "block": logits and masks cover the current block [start, end); "generation": every
                      generated column up to the block's end [gen_start, end) (needs a cache whose forwards feed
                      every column, i.e. none; full-attention families); "tail": the block and the rest of the
                      canvas [start, T) when the cache feeds every column, else the block (commits stay in the block)
  remasks             the strategy may return `StepEdits.remask` (committed positions back to MASK); the engine
                      tells the cache, and streams text only left of `final_limit()`
  final_limit()       per row, the absolute column below which committed text can no longer change (None: all)
  scratch_width(Lb)   K/V columns after the canvas that the strategy's own forwards (`self.ctx.forward`, e.g. a
                      verification pass) write to, so that the cache stays untouched
  attention(mask_fn)  the mask function every forward of the run is planned with (default: the canvas's own);
                      a strategy may change which keys a query sees (S2D2's causally computed prefix)
  caches              names of the cache policies the strategy works with (None: every one)
  request_defaults(params, state)  fills request fields the user left unset (a preset's block size)
  row_stats(row)      the strategy's own per-request counts (RequestMetrics.strategy_stats)
  run_class()         (optional) a loop of its own instead of the engine's canvas loop, for a strategy whose
                      steps are not "fill a block's masks" (TiDAR: draft, verify and pre-draft over an exact
                      cache, `decoding/tidar_run.py`); it has the canvas run's verbs (events, drop, close)
The engine sets `self.ctx` (a `dllm.step_context.StepContext`) before the first step.

A strategy = the model family's token proposal (`proposal.py`: x0 and the distribution confidences come from)
+ a selection rule (`choose`). `first_only` is set by cache policies that cannot give the block's first
position a prediction after the block-start forward (Fast-dLLM's cached Dream path): that forward then commits
exactly the block's first position.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dllm.decoding.proposal import PROPOSALS
from dllm.errors import InvalidParameterError
from dllm.options import resolve_options
from dllm.models.spec import ModelSpec
from dllm.sampling_params import SamplingParams


@dataclass
class StepEdits:
    """A step's decisions over the strategy's span ([B, S] columns, see `logits_span`)."""

    x0: torch.Tensor                     # [B, S] proposed tokens
    commit: torch.Tensor                 # [B, S] bool: masked positions that take x0
    remask: torch.Tensor | None = None   # [B, S] bool: committed generated positions turned back into MASK
    truncate: list[int | None] | None = None   # per row: absolute column where the row's canvas now ends


@dataclass
class TokenIds:
    """Device tensors of the ids a proposal needs, made once per run."""

    mask: torch.Tensor
    eos: torch.Tensor | None
    eos_eot: torch.Tensor | None


# SamplingParams fields that belong to one strategy or one family's proposal; a request that sets one the
# chosen strategy and model do not read is refused rather than silently ignored.
PROPOSAL_OPTIONS = {"llada": ("cfg_scale", "logits_eos_inf", "confidence_eos_eot_inf"),
                    "dream": ("top_p", "top_k"), "sdar": ("top_p", "top_k")}
ALL_OPTIONS = ("steps", "remasking", "threshold", "factor", "alg", "alg_temp", "eps", "entropy_bound",
               "cfg_scale", "logits_eos_inf", "confidence_eos_eot_inf", "top_p", "top_k")


class Strategy:
    name = "base"
    families: tuple[str, ...] = ("llada", "dream", "sdar")
    options: tuple[str, ...] = ()               # SamplingParams fields this selection rule reads
    steps_mode: str | None = None               # "total" | "per_block" | None: how SamplingParams.steps is read
    remasking: tuple[str, ...] = ()             # accepted SamplingParams.remasking values
    confidence_dtype: torch.dtype | None = torch.float64  # LLaDA proposal only (Fast-dLLM: float64)
    engine_options: dict = {}                   # engine-level settings (`LLM(..., strategy_options={...})`)
    logits_span: str = "block"                  # "block" | "generation" (see the module docstring)
    remasks: bool = False                       # may return StepEdits.remask
    caches: tuple[str, ...] | None = None       # cache policies it works with (None: all)

    def __init__(self, params: SamplingParams, spec: ModelSpec):
        self.params, self.spec = params, spec
        self.propose = PROPOSALS[spec.family]
        self.step_index = 0
        self._ids: TokenIds | None = None
        # Set by the engine: the shared state from `prepare`, the run's canvas (read-only; the state before the
        # current step's commit) and the first column of the current block.
        self.state: dict = {}
        self.canvas = None
        self.block_start = 0
        self.ctx = None

    @classmethod
    def resolve_engine_options(cls, options: dict) -> dict:
        return resolve_options("strategy", cls.name, cls.engine_options, options)

    @classmethod
    def prepare(cls, options: dict, loaded) -> dict:
        """Engine-level state shared by every run (e.g. a guide model), from `strategy_options`."""
        return cls.resolve_engine_options(options)

    @classmethod
    def request_defaults(cls, params: SamplingParams, state: dict) -> SamplingParams:
        """`params` with strategy-specific defaults for the fields the request left unset."""
        return params

    @classmethod
    def validate(cls, params: SamplingParams, spec: ModelSpec) -> None:
        """Refuse settings this strategy cannot honour for this family (called before decoding starts)."""
        if spec.family not in cls.families:
            raise InvalidParameterError(f"strategy '{cls.name}' does not support {spec.family} models")
        if params.remasking is not None and cls.remasking and params.remasking not in cls.remasking:
            raise InvalidParameterError(
                f"remasking={params.remasking!r} does not apply to {spec.family} models; use one of: "
                f"{', '.join(cls.remasking)}")
        allowed = set(cls.options) | set(PROPOSAL_OPTIONS[spec.family])
        defaults = SamplingParams()
        for name in ALL_OPTIONS:
            if name not in allowed and getattr(params, name) != getattr(defaults, name):
                raise InvalidParameterError(
                    f"{name} does not apply to strategy '{cls.name}' on {spec.family} models; leave it unset or pick "
                    f"a strategy that reads it (README: Decoding strategies)")

    def max_forwards(self, block_length: int) -> int:
        return block_length

    def scratch_width(self, block_length: int) -> int:
        """K/V columns after the canvas this strategy's own forwards need (0: it makes none)."""
        return 0

    def attention(self, mask_fn):
        """The mask function (q_start, q_end, k_end, k_start=0) -> bool mask that forwards are planned with."""
        return mask_fn

    def row_stats(self, row: int) -> dict:
        """Strategy-specific counts for row `row` of the current batch."""
        return {}

    def final_limit(self) -> list[int] | None:
        """Per row, the absolute column below which committed text is final (None: every committed prefix)."""
        return None

    def begin_block(self, masked: torch.Tensor) -> None:
        self.step_index = 0

    def step(self, logits: torch.Tensor, masked: torch.Tensor, generators: list, first_only: bool = False):
        # Seeded rows draw random numbers only while they have something to decode in the block.
        self.active = None if all(g is None for g in generators) else masked.any(-1).tolist()
        x0, probs = self.propose(logits, self.params, generators, self.token_ids(logits.device),
                                 self.confidence_dtype, self.active)
        if first_only:
            commit = torch.zeros_like(masked)
            commit[:, 0] = True
        else:
            commit = self.choose(x0, probs, masked, generators)
        self.step_index += 1
        if isinstance(commit, StepEdits):   # a rule that also edits the canvas (Learn2PD's end-of-text cut)
            return replace(commit, commit=commit.commit & masked)
        return x0, commit & masked

    def choose(self, x0, probs, masked, generators) -> torch.Tensor | StepEdits:
        """The positions to commit [B, S] (or, for a rule that also re-masks or truncates, `StepEdits`)."""
        raise NotImplementedError

    def select_rows(self, keep: torch.Tensor) -> None:
        pass

    def token_ids(self, device: torch.device) -> TokenIds:
        if self._ids is None:
            spec = self.spec
            t = lambda ids: torch.tensor(ids, dtype=torch.long, device=device) if ids else None  # noqa: E731
            self._ids = TokenIds(t([spec.mask_id]), t([spec.eos_id] if spec.eos_id is not None else []),
                                 t([i for i in (spec.eos_id, spec.eot_id) if i is not None]))
        return self._ids


def chosen_probability(x0: torch.Tensor, probs: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """p(x0) per position, -inf where not masked."""
    return probs.gather(-1, x0[..., None]).squeeze(-1).masked_fill(~masked, -torch.inf)

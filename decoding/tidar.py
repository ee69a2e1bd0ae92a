"""TiDAR decoding (Think in Diffusion, Talk in Autoregression, arXiv 2511.08923) and plain AR decoding of the same
model. Both run through `decoding/tidar_run.py` (the loop and its exact K/V cache); this module holds the
strategies (names, options, checks) and the verification maths.

One TiDAR step, per row, with the last committed token t at position n (its K/V not yet cached), drafts
d_1..d_k at n+1..n+k, one forward over
    [t, d_1..d_k]                        causal over the cached prefix (the AR rows: row i gives p(x_{n+i+1}))
  + branch j = 0..k: k+1 MASK tokens at positions n+j+1..n+j+k+1, seeing the prefix, t and d_1..d_j,
    bidirectional inside the branch, invisible to the other branches (the pre-drafts if j drafts are accepted)
then: accept the longest prefix d_1..d_j the AR rows agree with (greedy: argmax equality; sampling: speculative
rejection sampling, which keeps the AR distribution exactly), commit d_1..d_j and the AR token of row j (the
correction at the first mismatch, or the bonus token when all k are accepted), and take the drafts of branch j,
rows 1..k (row 0 sits at the AR token's position and is not used). With `bonus_token=False` a fully accepted row
commits its k drafts only; d_k is then fed again as the pending token and the next drafts are rows 0..k-1. K/V of t and the accepted drafts stay in the
cache; those of rejected drafts and of every MASK row are overwritten later (never attended to).
The first step prefills the prompt causally with one branch after it. `ar` is the same loop with no drafts and no
branches: one token per forward.
"""
from __future__ import annotations

import torch

from dllm.decoding.base import Strategy
from dllm.errors import InvalidParameterError
from dllm.models.spec import ModelSpec
from dllm.sampling_params import SamplingParams

_OWN_OPTIONS = ("temperature", "max_tokens", "stop_token_ids", "ignore_eos", "seed", "skip_special_tokens")


class TiDARStrategy(Strategy):
    name = "tidar"
    families = ("tidar",)
    caches = ("none",)                     # the run keeps its own exact K/V cache
    # draft_length 0: the checkpoint's; bonus_token: on full acceptance also commit the AR token after d_k
    engine_options = {"draft_length": 0, "bonus_token": True}

    @classmethod
    def prepare(cls, options: dict, loaded) -> dict:
        opts = cls.resolve_engine_options(options)
        trained = loaded.spec.defaults.get("draft_length", (loaded.spec.native_block_size or 2) - 1)
        k = opts["draft_length"] or trained
        if not 1 <= k <= 64:
            raise InvalidParameterError(f"strategy option draft_length must be in [1, 64] (0: the checkpoint's "
                                        f"{trained}), got {opts['draft_length']}")
        return {**opts, "draft_length": k}

    @classmethod
    def run_class(cls):
        from dllm.decoding.tidar_run import TiDARRun
        return TiDARRun

    @classmethod
    def validate(cls, params: SamplingParams, spec: ModelSpec) -> None:
        if spec.family not in cls.families:
            raise InvalidParameterError(f"strategy '{cls.name}' needs a TiDAR model; {spec.family} models have "
                                        "their own strategies (README: Decoding strategies)")
        defaults = SamplingParams()
        for name in ("steps", "remasking", "threshold", "factor", "alg", "alg_temp", "eps", "entropy_bound",
                     "cfg_scale", "logits_eos_inf", "confidence_eos_eot_inf", "top_p", "top_k"):
            if getattr(params, name, None) != getattr(defaults, name, None):
                raise InvalidParameterError(f"{name} does not apply to strategy '{cls.name}' (it reads "
                                            "temperature, max_tokens and the stop settings); leave it unset")


class TiDARAutoregressive(TiDARStrategy):
    """The same TiDAR model decoded autoregressively (its causal half alone): one token per forward."""

    name = "ar"
    engine_options = {}

    @classmethod
    def prepare(cls, options: dict, loaded) -> dict:
        return {**cls.resolve_engine_options(options), "draft_length": 0}


def verify_greedy(drafts: torch.Tensor, ar_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts [B, k], ar_logits [B, k+1, V] (row i: the distribution of the token after d_i, row 0 after t) ->
    (accepted [B] in 0..k, AR token [B]: argmax of row `accepted`)."""
    ar = ar_logits.argmax(-1)                                                  # [B, k+1]
    agree = (drafts == ar[:, :-1]).long()                                      # [B, k]
    accepted = agree.cumprod(1).sum(1)
    return accepted, ar.gather(1, accepted[:, None]).squeeze(1)


def verify_sample(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, uniform: torch.Tensor,
                  generators: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023). drafts [B, k] drawn from q
    [B, k, V] (the pre-draft distributions), p [B, k+1, V] the AR distributions, uniform [B, k] in [0, 1).
    Draft i is kept with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from
    norm(max(p_i - q_i, 0)); when all are kept, the bonus token from p_k. The committed tokens are then
    distributed exactly as AR sampling from p. -> (accepted [B], AR token [B])."""
    b, k = drafts.shape
    p_d = p[:, :k].gather(2, drafts[..., None]).squeeze(2)
    q_d = q.gather(2, drafts[..., None]).squeeze(2)
    keep = (uniform * q_d < p_d).long()                   # u < p/q, written without dividing by q
    accepted = keep.cumprod(1).sum(1)
    rows = torch.arange(b, device=drafts.device)
    p_next = p[rows, accepted]                                                   # [B, V]
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, accepted]      # zeros after a full acceptance
    residual = (p_next - q_next).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p_next)  # p == q: any draw from p
    return accepted, sample_rows(residual, generators)


def sample_rows(probs: torch.Tensor, generators: list) -> torch.Tensor:
    """One draw per row of probs [B, V], row b from generators[b] (or the global generator)."""
    if all(g is None for g in generators):
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.stack([torch.multinomial(probs[i], 1, generator=g).squeeze(0) for i, g in enumerate(generators)])


def uniform_rows(b: int, k: int, generators: list, device) -> torch.Tensor:
    if all(g is None for g in generators):
        return torch.rand(b, k, device=device, dtype=torch.float64)
    return torch.stack([torch.rand(k, device=device, dtype=torch.float64, generator=g) for g in generators])

"""S2D2's router: whether a step's verification forward is worth its cost (arXiv 2603.25702; phymhan/S2D2
`SDAR/generate_ssd_policy.py::_decide_do_verify` and the functions it calls).

Everything here reads only the draft forward's logits (no extra forward). Per step and row, over the first run
of masked positions of the block (the span):
  alpha_i   a per-token acceptance estimate (`ESTIMATORS`), clamped to [0, 1]
  E[K]      = sum_k prod_{i<=k} alpha_i, the expected accepted prefix length
  score     difference_static: E[K] - c;  difference_dynamic: E[K] - c * N_hi, N_hi = masked positions of the
            block whose draft confidence exceeds the threshold (what the no-verify step would commit anyway)
Policies (`POLICIES`): mask_span_length (verify iff the span has >= min_ssd_span_length tokens), score_threshold
(score >= tau), score_hysteresis (on: stay on unless score < tau_off; off: turn on iff score > tau_on, strict as
in the authors' experiments), contextual_bandit_ucb (UCB1 over (span length, block progress, span entropy)
buckets with reward = tokens decoded / forwards spent). Router state lives in one `RowRouter` per request, so a
row decides as it would alone.
"""
from __future__ import annotations

import math

import torch

ESTIMATORS = ("hard_margin_threshold", "hard_entropy_threshold", "soft_confidence_power",
              "soft_clipped_linear_margin", "soft_entropy_negexp", "soft_renyi_2_entropy")
POLICIES = ("mask_span_length", "score_threshold", "score_hysteresis", "contextual_bandit_ucb")
SCORES = ("difference_dynamic", "difference_static")


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(probs) / ln V per row of probs [S, V] (V counts every vocabulary row of the logits)."""
    if probs.shape[-1] <= 1:
        return torch.zeros(probs.shape[0], dtype=probs.dtype, device=probs.device)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return entropy / torch.log(torch.tensor(float(probs.shape[-1]), dtype=probs.dtype, device=probs.device))


def _margin(probs: torch.Tensor) -> torch.Tensor:
    if probs.shape[-1] < 2:
        return probs[:, 0]
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def acceptance_estimates(name: str, probs: torch.Tensor, confidence: torch.Tensor, opts: dict) -> torch.Tensor:
    """alpha_i [S] for the span: probs [S, V] its draft distributions (the sampling transform applied),
    confidence [S] the draft tokens' probabilities."""
    if name == "hard_margin_threshold":
        return (_margin(probs) > opts["ssd_confidence_margin_threshold"]).to(confidence.dtype)
    if name == "hard_entropy_threshold":
        return (normalized_entropy(probs) < opts["ssd_entropy_threshold"]).to(confidence.dtype)
    if name == "soft_confidence_power":
        return confidence.clamp(0.0, 1.0) ** opts["ssd_confidence_power"]
    if name == "soft_clipped_linear_margin":
        return (opts["ssd_confidence_margin_coef"] * _margin(probs)).clamp(0.0, 1.0)
    if name == "soft_entropy_negexp":
        return torch.exp(-opts["ssd_entropy_temperature"] * normalized_entropy(probs))
    if name == "soft_renyi_2_entropy":
        return (probs ** 2).sum(-1).clamp(0.0, 1.0)
    raise ValueError(name)


def expected_accepted(alpha: torch.Tensor) -> float:
    """E[K] = sum_{k=1..S} prod_{i<=k} alpha_i (0 for an empty span)."""
    if alpha.numel() == 0:
        return 0.0
    return float(torch.cumprod(alpha.clamp(0.0, 1.0), dim=0).sum())


def bin_index(value: float, lo: float, hi: float, bins: int) -> int:
    """Equal-width bin of value clamped to [lo, hi]; 0 when there is one bin or the range is empty."""
    if bins <= 1 or hi <= lo:
        return 0
    ratio = (min(max(float(value), lo), hi) - lo) / (hi - lo)
    return min(bins - 1, max(0, int(ratio * bins)))


class RowRouter:
    """One request's routing state (hysteresis switch, UCB counts), persistent across its blocks."""

    def __init__(self, opts: dict):
        self.opts = opts
        self.is_on = False
        buckets = opts["ucb_span_length_bins"] * opts["ucb_block_progress_bins"] * opts["ucb_entropy_bins"]
        self.count = [[0] * buckets for _ in range(2)]       # action 0 = skip, 1 = verify
        self.reward = [[0.0] * buckets for _ in range(2)]
        self.t = 0
        self.pending: tuple[int, int] | None = None          # (action, bucket) awaiting its reward

    def decide(self, probs_of, span_logits, masked_logits, span_confidence, num_masked: int,
               num_high: int, unmasked: int, block_length: int) -> bool:
        """Verify this step? span_logits [S, V] / masked_logits [M, V] are the draft logits of the span / of
        every masked position; probs_of maps logits to the sampling distribution."""
        o, policy = self.opts, self.opts["do_verify_policy"]
        span = span_logits.shape[0]
        if policy == "mask_span_length":
            short = span < o["min_ssd_span_length"]
            if short and o["legacy_ssd_span_strategy"]:    # skip only when enough tokens clear the threshold
                short = num_high >= min(o["min_ssd_span_length"], num_masked)
            return not short
        if policy in ("score_threshold", "score_hysteresis"):
            score = self._score(probs_of, span_logits, span_confidence, num_high) if span else -math.inf
            if policy == "score_threshold":
                return score >= o["do_verify_score_threshold"]
            self.is_on = score >= o["hysteresis_threshold_off"] if self.is_on else score > o["hysteresis_threshold_on"]
            return self.is_on
        return self._ucb(probs_of, span_logits, masked_logits, unmasked, block_length)

    def _score(self, probs_of, span_logits, span_confidence, num_high: int) -> float:
        o = self.opts
        alpha = acceptance_estimates(o["token_acceptance_estimator"], probs_of(span_logits), span_confidence, o)
        gain, c = expected_accepted(alpha), o["score_penalty_coef"]
        return gain - c * num_high if o["do_verify_score_type"] == "difference_dynamic" else gain - c

    def _ucb(self, probs_of, span_logits, masked_logits, unmasked: int, block_length: int) -> bool:
        o = self.opts
        self.t += 1
        source = span_logits if o["ucb_entropy_source"] == "span" else masked_logits
        entropy = float(normalized_entropy(probs_of(source)).mean()) if source.numel() else 0.0
        progress = min(1.0, max(0.0, unmasked / max(1, block_length)))
        eb, pb = o["ucb_entropy_bins"], o["ucb_block_progress_bins"]
        bucket = ((bin_index(max(1, span_logits.shape[0]), 1.0, float(max(1, block_length)),
                             o["ucb_span_length_bins"]) * pb
                   + bin_index(progress, 0.0, 1.0, pb)) * eb + bin_index(entropy, 0.0, 1.0, eb))
        log_t = math.log(max(1, self.t))
        scores = []
        for action in (0, 1):
            n = self.count[action][bucket]
            if n == 0:
                scores.append(math.inf)
                continue
            bonus = 0.0 if log_t <= 0.0 else o["ucb_beta"] * math.sqrt(log_t / n)
            scores.append(self.reward[action][bucket] / n + bonus)
        action = 1 if scores[1] >= scores[0] else 0
        self.pending = (action, bucket)
        return action == 1

    def reward_step(self, decoded: int, verified: bool) -> None:
        """UCB: credit the step's decision with tokens decoded per forward spent."""
        if self.pending is None:
            return
        action, bucket = self.pending
        self.count[action][bucket] += 1
        self.reward[action][bucket] += decoded / (2.0 if verified else 1.0)
        self.pending = None

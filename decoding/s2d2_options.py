"""S2D2's options (`strategy_options` / CLI `--strategy-option k=v`), named as the authors' arguments, and the
paper's SDAR configurations as presets.

Defaults are the authors' command-line defaults (`generate_ssd_policy.py` argparse), which their scripts run;
three differ from the function's keyword defaults (do_verify_score_threshold 0 vs -1, ssd_confidence_power 0.8 vs
1.0, ssd_entropy_threshold 0.1 vs 0.5). The fallback rule and its threshold are the request's `remasking`,
`threshold` and `entropy_bound`; the quota schedule is `steps` per block (SDAR's `denoising_steps`).

A preset sets the options of a paper configuration (README of phymhan/S2D2, "SDAR-8B"); options given alongside
it override it, and a request that leaves block_length, steps, remasking or threshold unset gets the preset's.
"""
from __future__ import annotations

import dataclasses

from dllm.errors import InvalidParameterError
from dllm.options import resolve_options
from dllm.decoding.s2d2_router import ESTIMATORS, POLICIES, SCORES

OPTIONS = {
    "preset": "",
    "do_verify_policy": "mask_span_length",
    "min_ssd_span_length": 1,
    "legacy_ssd_span_strategy": False,
    "do_verify_score_threshold": 0.0,
    "hysteresis_threshold_on": 0.0,
    "hysteresis_threshold_off": -1.0,
    "do_verify_score_type": "difference_dynamic",
    "score_penalty_coef": 2.0,
    "token_acceptance_estimator": "hard_margin_threshold",
    "ssd_confidence_margin_threshold": 0.05,
    "ssd_confidence_power": 0.8,
    "ssd_entropy_threshold": 0.1,
    "ssd_confidence_margin_coef": 1.0,
    "ssd_entropy_temperature": 1.0,
    "ucb_beta": 1.0,
    "ucb_span_length_bins": 2,
    "ucb_block_progress_bins": 2,
    "ucb_entropy_bins": 2,
    "ucb_entropy_source": "span",
    "ssd_ratio_tempering_factor": 1.0,
    "ssd_ratio_threshold": -1.0,
    "ssd_threshold_all_spans": False,
    "always_check_high_confidence": False,
    "allow_resample": True,
    "cache_ver": False,
    "draft_ver": False,
}

_PAPER = {"do_verify_policy": "score_threshold", "do_verify_score_threshold": 0.0,
          "do_verify_score_type": "difference_static", "token_acceptance_estimator": "soft_entropy_negexp",
          "cache_ver": True, "draft_ver": True}
# name -> (options, request defaults)
PRESETS = {
    "config-a": ({**_PAPER, "score_penalty_coef": 1.0},
                 {"block_length": 4, "steps": 4, "remasking": "low_confidence_dynamic", "threshold": 0.85}),
    "config-b": ({**_PAPER, "score_penalty_coef": 0.0},
                 {"block_length": 16, "steps": 16, "remasking": "low_confidence_dynamic", "threshold": 0.85}),
}

_CHOICES = {"do_verify_policy": POLICIES, "do_verify_score_type": SCORES,
            "token_acceptance_estimator": ESTIMATORS, "ucb_entropy_source": ("span", "masked")}


def resolve(given: dict) -> dict:
    """Defaults, then the preset, then the options given; every value checked (one-line errors)."""
    opts = resolve_options("strategy", "s2d2", OPTIONS, given)
    preset = opts["preset"]
    if preset:
        if preset not in PRESETS:
            raise InvalidParameterError(f"strategy option preset={preset!r} is not a preset; choose one of: "
                                        f"{', '.join(PRESETS)}")
        opts = {**opts, **PRESETS[preset][0], **{k: opts[k] for k in given}}
    for key, choices in _CHOICES.items():
        if opts[key] not in choices:
            raise InvalidParameterError(f"strategy option {key}={opts[key]!r} is not one of: {', '.join(choices)}")
    for key in ("ucb_span_length_bins", "ucb_block_progress_bins", "ucb_entropy_bins", "min_ssd_span_length"):
        if opts[key] < 1:
            raise InvalidParameterError(f"strategy option {key}={opts[key]} must be at least 1")
    if not opts["hysteresis_threshold_on"] > opts["hysteresis_threshold_off"]:
        raise InvalidParameterError("strategy options need hysteresis_threshold_on > hysteresis_threshold_off "
                                    f"(got {opts['hysteresis_threshold_on']} and {opts['hysteresis_threshold_off']})")
    if opts["ssd_ratio_tempering_factor"] <= 0:
        raise InvalidParameterError("strategy option ssd_ratio_tempering_factor must be > 0")
    return opts


def request_defaults(params, opts: dict):
    """The request with the preset's block_length, steps, remasking and threshold where it leaves them unset."""
    if not opts.get("preset"):
        return params
    fill = {k: v for k, v in PRESETS[opts["preset"]][1].items() if getattr(params, k) is None}
    if params.block_length is not None:     # a block size of the request's own: steps default to it (SDAR's)
        fill.pop("steps", None)
    return dataclasses.replace(params, **fill) if fill else params

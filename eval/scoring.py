"""GSM8K-style final-answer extraction and comparison.

Two extractors, after lm-evaluation-harness's gsm8k task (`lm_eval/tasks/gsm8k/gsm8k.yaml`): `extract_strict`
reads the number after the last `####` (the format the worked solutions end with), `extract_flexible` is
lm-eval's "flexible-extract" filter: the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`. Both return the match
normalised by `normalize_number` (no thousands commas, no `$`, no trailing `.`) or None when there is none.
`is_correct(pred, gold)` compares two such strings as numbers.

Where this differs from lm-eval's "strict-match" (`#### (\\-?[0-9\\.\\,]+)`, first match, then string equality
after dropping `,`, `$` and one trailing `.`): the last `####` counts, not the first; `$` and spaces may
follow `####`; and `12.0` equals `12`.

This module knows nothing about tasks, models or tokenizers: text in, strings and booleans out.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# Right after `####`: optional spaces and `$`, then a number that may carry commas and a decimal point.
_AFTER_MARK = re.compile(r"\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
# lm-eval's flexible-extract pattern: a run of two or more of `$0-9.,`, or a single (signed) digit string.
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(text: str) -> str:
    """`"$1,234."` -> `"1234"`: strip spaces, `$`, thousands commas and a trailing period."""
    text = text.strip().replace("$", "").replace(",", "")
    return text.rstrip(".")


def extract_strict(text: str) -> str | None:
    """The normalised number right after the last `####` in `text`; None when `text` has no `####` or no
    number follows the last one."""
    _, mark, tail = text.rpartition("####")
    match = _AFTER_MARK.match(tail) if mark else None
    return normalize_number(match.group(1)) if match else None


def extract_flexible(text: str) -> str | None:
    """The normalised last match of lm-eval's flexible-extract pattern in `text` (group_select -1), or None
    when nothing matches. Like lm-eval, a run such as `...` counts as a match (and then names no number)."""
    matches = _FLEXIBLE.findall(text)
    return normalize_number(next(g for g in matches[-1] if g)) if matches else None


def _as_decimal(text: str) -> Decimal | None:
    try:
        return Decimal(normalize_number(text))
    except InvalidOperation:
        return None


def is_correct(pred: str | None, gold: str) -> bool:
    """True when `pred` names the same number as `gold` (`"12.0"` equals `"12"`, `"1,000"` equals `"1000"`);
    non-numbers are compared as normalised strings. A missing prediction (None) is never correct."""
    if pred is None:
        return False
    pred_value, gold_value = _as_decimal(pred), _as_decimal(gold)
    if pred_value is not None and gold_value is not None:
        return pred_value == gold_value
    return normalize_number(pred) == normalize_number(gold)

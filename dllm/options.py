"""Named options of a pluggable part (a cache policy's `cache_options`, a strategy's `strategy_options`): known
names only, defaults filled, values (possibly CLI text) coerced to the type of their default."""
from __future__ import annotations

from dllm.errors import InvalidParameterError


def resolve_options(owner: str, name: str, defaults: dict, given: dict) -> dict:
    """`defaults` with `given` applied; `owner` and `name` ("cache", "dkv") word the one-line errors."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        known = ", ".join(defaults) or "none"
        raise InvalidParameterError(f"{owner} '{name}' has no option {unknown[0]!r}; its options: {known}")
    resolved = dict(defaults)
    for key, value in given.items():
        default = defaults[key]
        try:
            resolved[key] = _coerce(value, default)
        except (TypeError, ValueError):
            raise InvalidParameterError(f"{owner} option {key}={value!r} must be a {type(default).__name__} "
                                        f"(default {default!r})") from None
    return resolved


def _coerce(value, default):
    """`value` (possibly the text of a CLI option) as the type of `default`; any value when the default is None."""
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ValueError(value)
    if isinstance(default, int) and not isinstance(value, bool):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(default, float) and not isinstance(value, bool):
        return float(value)
    if default is None or isinstance(default, str):
        return value
    raise TypeError(value)

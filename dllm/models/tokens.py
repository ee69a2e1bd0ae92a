"""Reading token ids from a checkpoint's tokenizer and config values."""
from __future__ import annotations


def token_id(tokenizer, token: str | None) -> int | None:
    """The id of a token by name, or None when the tokenizer (or the name) is absent."""
    if tokenizer is None or not token:
        return None
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else int(tid)


def id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]

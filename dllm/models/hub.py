"""Fetching a checkpoint from the Hugging Face hub by id, failing in one line when the hub cannot be used.

The hub is asked once, with a short timeout, whether the repository exists (`model_info`); only then does
`snapshot_download` run. Without that check an unreachable or silent network turns into huggingface_hub's
retries and per-request timeouts (minutes of doubled warnings) before any error. With `HF_HUB_OFFLINE=1`, or
when the check fails for want of a network, a copy already in the local hub cache is used if there is one.
"""
from __future__ import annotations

from pathlib import Path

from dllm.errors import ModelNotFoundError

HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]
CHECK_TIMEOUT_S = 2.0       # one round trip to the hub's API; a reachable hub answers in well under a second
_LOCAL_HINT = "pass a local checkpoint directory (download one elsewhere with `hf download ID --local-dir DIR`)"


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of `repo_id` (downloaded, or from the hub cache when offline)."""
    import huggingface_hub as hub
    if hub.is_offline_mode():
        return _cached(repo_id, revision, "HF_HUB_OFFLINE is set")
    reason = _unreachable(repo_id, revision)
    if reason is not None:
        return _cached(repo_id, revision, f"the Hugging Face hub cannot be reached ({reason})")
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except Exception as exc:  # a failure mid-download (disk, network): one line, not huggingface_hub's traceback
        raise ModelNotFoundError(f"downloading {repo_id!r} from the Hugging Face hub failed ({_one_line(exc)}); "
                                 f"try again, or {_LOCAL_HINT}") from None


def _unreachable(repo_id: str, revision: str | None) -> str | None:
    """None when the hub answers that the repository exists; the reason when the hub cannot be reached. A
    repository the hub does not have (or does not let us see) is an error at once."""
    import huggingface_hub as hub
    from huggingface_hub import errors
    try:
        hub.model_info(repo_id, revision=revision, timeout=CHECK_TIMEOUT_S)
        return None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as exc:
        raise ModelNotFoundError(f"{repo_id!r} is not a local directory, and the Hugging Face hub says: "
                                 f"{_one_line(exc)}; check the name (and --revision), log in for a gated model, or "
                                 f"{_LOCAL_HINT}") from None
    except errors.HfHubHTTPError as exc:
        return _one_line(exc)
    except Exception as exc:  # connection refused, DNS, timeouts: the network, not the name
        return _one_line(exc)


def _cached(repo_id: str, revision: str | None, why: str) -> Path:
    import huggingface_hub as hub
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        raise ModelNotFoundError(f"{repo_id!r} is not a local directory and not in the local hub cache, and {why}; "
                                 f"{_LOCAL_HINT}") from None


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__

"""User-facing errors. Each message is one line that says what is wrong and how to fix it; the CLI prints
it as `error: <message>` and exits with status 2, the API raises it (all are `ValueError`s)."""


class DllmError(ValueError):
    """Base class: bad input from the user, never a bug in dllm."""


class ModelNotFoundError(DllmError):
    """The model path or hub id cannot be resolved to a checkpoint directory."""


class UnsupportedModelError(DllmError):
    """The checkpoint is of an architecture or layout dllm does not implement."""


class InvalidParameterError(DllmError):
    """A sampling, cache, strategy or device option has a value that cannot work."""


class DatasetUnavailableError(DllmError):
    """An evaluation data set can be loaded neither from a given file nor through an installed package."""


def check_unicode(field: str, text: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800", which JSON can carry but no
    tokenizer can encode), naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameterError(f"{field} is not valid Unicode: {text[exc.start:exc.end]!r} at character "
                                    f"{exc.start} is a lone surrogate; send well-formed UTF-8 text") from None

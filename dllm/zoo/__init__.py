"""The model zoo: small diffusion LMs trained by dllm on its checkable tasks and shipped inside the package, in
the real checkpoint layout of each family, with their shared tokenizer. `tiny-llada` is the default model of
`LLM()` and of the CLI; any zoo name (`LLM("tiny-sdar")`) resolves to the bundled directory, offline."""
from __future__ import annotations

import pathlib

MODELS_DIR = pathlib.Path(__file__).resolve().parent / "models"
FILTERS_DIR = pathlib.Path(__file__).resolve().parent / "filters"   # Learn2PD filters, one per zoo model
DEFAULT_MODEL = "tiny-llada"
ZOO_MODELS = ("tiny-llada", "tiny-dream", "tiny-sdar", "tiny-ar", "tiny-tidar")


def bundled_path(name: str) -> pathlib.Path | None:
    """The bundled directory of a zoo model name, or None when `name` is not one."""
    if name in ZOO_MODELS and (MODELS_DIR / name / "config.json").is_file():
        return MODELS_DIR / name
    return None

"""Shared fixtures: tiny LLaDA checkpoints written in the real Hugging Face layout, loaded through the public
API; the project's shared data directory (../shared beside the checkout) when present."""
from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from checkpoints import load_tiny_state_dict, write_tiny_dream, write_tiny_llada, write_tiny_sdar  # noqa: E402
from reference_llada import RefLLaDA  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add contention
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("DLLM_SHARED_DIR", REPO.parent / "shared"))
    if not (path / "data").is_dir():
        pytest.skip(f"the project's shared data directory is not at {path} (set DLLM_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory, shared_dir) -> pathlib.Path:
    return write_tiny_llada(tmp_path_factory.mktemp("ckpt") / "tiny-llada", seed=0)


@pytest.fixture(scope="session")
def tiny_llada_sharded(tmp_path_factory, shared_dir) -> pathlib.Path:
    return write_tiny_llada(tmp_path_factory.mktemp("ckpt") / "tiny-llada-sharded", seed=0, num_shards=3)


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory, shared_dir) -> pathlib.Path:
    return write_tiny_dream(tmp_path_factory.mktemp("ckpt") / "tiny-dream", seed=0)


@pytest.fixture(scope="session")
def tiny_sdar(tmp_path_factory, shared_dir) -> pathlib.Path:
    return write_tiny_sdar(tmp_path_factory.mktemp("ckpt") / "tiny-sdar", seed=0)


@pytest.fixture(scope="session")
def ref_model(tiny_llada) -> RefLLaDA:
    cfg, sd = load_tiny_state_dict(tiny_llada)
    return RefLLaDA(cfg, sd)


@pytest.fixture(scope="session")
def llm_factory(tiny_llada):
    """LLM(tiny_llada, cache=..., strategy=...) built once per combination."""
    from dllm import LLM
    built = {}

    def make(cache="none", strategy="reference", path=None, **kw):
        key = (cache, strategy, str(path or tiny_llada), tuple(sorted(kw.items())))
        if key not in built:
            built[key] = LLM(str(path or tiny_llada), cache=cache, strategy=strategy, device="cpu", **kw)
        return built[key]

    return make

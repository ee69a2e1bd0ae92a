"""Shared fixtures: tiny checkpoints written in the real Hugging Face layout, loaded through the public API, and the
committed test data (tests/data: real checkpoint metadata, a GSM8K excerpt). Nothing here reads outside the
repository, so a clone anywhere runs the whole suite.

A skipped test is a check that did not run: the session fails when any test skips for a reason other than
missing hardware (the `gpu` marker), so that a green run means every CPU check ran."""
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
os.environ.setdefault("OMP_NUM_THREADS", "1")  # ...in the CLI subprocesses too; and LLM() keeps this choice
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
ALLOWED_SKIP_MARKERS = ("gpu",)   # hardware this machine may lack; anything else that skips fails the run
_unexpected_skips: list[tuple[str, str]] = []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _note_skip(report) -> None:
    if report.skipped and not getattr(report, "wasxfail", None) \
            and not any(m in report.keywords for m in ALLOWED_SKIP_MARKERS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _unexpected_skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)    # a module-level importorskip skips the whole file at collection


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("checks that did not run (only `gpu`-marked tests may skip)", red=True)
        for nodeid, reason in _unexpected_skips:
            terminalreporter.line(f"{nodeid}: {reason}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def real_checkpoints() -> pathlib.Path:
    """The real checkpoints' metadata, one folder each (tests/data/README.md)."""
    return DATA_DIR / "checkpoints"


@pytest.fixture(scope="session")
def gsm8k_dir() -> pathlib.Path:
    """A 10-problem GSM8K excerpt: test.jsonl (4 problems) and train.jsonl (6)."""
    return DATA_DIR / "gsm8k"


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory) -> pathlib.Path:
    return write_tiny_llada(tmp_path_factory.mktemp("ckpt") / "tiny-llada", seed=0)


@pytest.fixture(scope="session")
def tiny_llada_sharded(tmp_path_factory) -> pathlib.Path:
    return write_tiny_llada(tmp_path_factory.mktemp("ckpt") / "tiny-llada-sharded", seed=0, num_shards=3)


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory) -> pathlib.Path:
    return write_tiny_dream(tmp_path_factory.mktemp("ckpt") / "tiny-dream", seed=0)


@pytest.fixture(scope="session")
def tiny_sdar(tmp_path_factory) -> pathlib.Path:
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

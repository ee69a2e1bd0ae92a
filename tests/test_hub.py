"""A hub id without a usable network: one line, quickly, through the real `dllm` entry point; with
HF_HUB_OFFLINE=1 a copy in the local hub cache is used. Every address here is on the loopback interface."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

LIMIT_S = 30      # the CLI's own start (torch, transformers) takes seconds on a busy machine; the check adds <= 2 s


def dllm(*args, env: dict, timeout: float = 120):
    exe = shutil.which("dllm")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "dllm.cli", *args]
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**base, **env})
    return r, time.monotonic() - start


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]     # nothing listens there once the socket closes: connection refused


@pytest.fixture
def silent_server():
    """A loopback server that accepts connections and never answers (a network that swallows requests)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def _one_line_error(r) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_offline_mode_is_one_line_at_once(tmp_path):
    r, seconds = dllm("generate", "--model", "some-org/some-model", "-p", "x",
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    line = _one_line_error(r)
    assert "'some-org/some-model' is not a local directory and not in the local hub cache" in line
    assert "HF_HUB_OFFLINE" in line and "local checkpoint directory" in line and seconds < LIMIT_S


@pytest.mark.parametrize("network", ["refused", "silent"])
def test_unreachable_hub_is_one_line(tmp_path, silent_server, network):
    endpoint = silent_server if network == "silent" else f"http://127.0.0.1:{_closed_port()}"
    r, seconds = dllm("generate", "--model", "some-org/some-model", "-p", "x",
                      env={"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path)})
    line = _one_line_error(r)
    assert "the Hugging Face hub cannot be reached" in line and "local checkpoint directory" in line
    assert ("ReadTimeout" if network == "silent" else "ConnectError") in line
    assert seconds < LIMIT_S


def test_offline_mode_uses_the_hub_cache(tmp_path, tiny_llada):
    """A model downloaded earlier (the hub cache's layout: refs/main -> snapshots/<commit>/) loads offline."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--some-org--tiny"
    shutil.copytree(tiny_llada, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    r, _ = dllm("generate", "--model", "some-org/tiny", "-p", "hi", "--max-tokens", "8", "--block-length", "8",
                "--device", "cpu", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr

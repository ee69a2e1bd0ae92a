"""Data-parallel evaluation on the CPU: two engine processes give the records one engine gives (up to order),
into one run directory that resumes and extends; the CLI takes --data-parallel-size."""
from __future__ import annotations

import json
import subprocess
import sys

from dllm.eval.runner import EvalConfig, run

KEYS = ("generation", "correct", "tokens", "nfe", "finish_reason", "seed")


def _records(path):
    rows = [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]
    return {(r["doc_id"], r["sample"]): {k: r[k] for k in KEYS} for r in rows}


def test_two_engines_give_one_engines_records_and_resume(tmp_path):
    config = EvalConfig(task="arith", model="tiny-llada", cache="dual", strategy="threshold", batch_size=4,
                        device="cpu", sampling={"max_tokens": 64})
    single = run(config, tmp_path / "one", limit=6, progress=False, warmup=False)
    first = run(config, tmp_path / "two", limit=3, progress=False, warmup=False, data_parallel_size=2)
    assert first.environment["data_parallel_size"] == 2
    extended = run(config, tmp_path / "two", limit=6, progress=False, warmup=False, data_parallel_size=2)
    assert _records(tmp_path / "two") == _records(tmp_path / "one")
    assert extended.metrics["accuracy"] == single.metrics["accuracy"]
    assert extended.metrics["throughput"] > 0
    again = run(config, tmp_path / "two", limit=6, progress=False, warmup=False, data_parallel_size=2)
    assert len((tmp_path / "two" / "samples.jsonl").read_text().splitlines()) == 6   # nothing decoded twice
    assert again.metrics["accuracy"] == single.metrics["accuracy"]


def test_cli_takes_the_data_parallel_size(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "dllm.cli", "eval", "--task", "arith", "--limit", "2", "--device", "cpu",
                        "--data-parallel-size", "2", "--max-tokens", "64", "--no-progress", "--no-warmup",
                        "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["environment"]["data_parallel_size"] == 2
    r = subprocess.run([sys.executable, "-m", "dllm.cli", "eval", "--task", "arith", "--limit", "2", "--device",
                        "cpu", "--data-parallel-size", "0", "--output", str(tmp_path / "bad")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "positive integer" in r.stderr

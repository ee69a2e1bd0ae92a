"""`dllm bench` (`eval/bench.py`): grid syntax, which settings a grid expands to, the Pareto front by hand, and a
2 x 2 grid on the bundled tiny-llada through the real command (table, JSON, plot, refused combinations, resume)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dllm.cli import main
from dllm.errors import InvalidParameterError
from dllm.eval.bench import expand, label, parse_grid
from dllm.eval.metrics import pareto_front
from dllm.eval.runner import EvalConfig

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def test_grid_names_and_values():
    axes = parse_grid(["strategies=reference,threshold", "caches=none,prefix,dual", "thresholds=0.7,0.9",
                       "block-lengths=8,32", "batch_size=4", "logits-eos-inf=true,false"])
    assert axes == {"strategy": ["reference", "threshold"], "cache": ["none", "prefix", "dual"],
                    "threshold": [0.7, 0.9], "block_length": [8, 32], "batch_size": [4],
                    "logits_eos_inf": [True, False]}


@pytest.mark.parametrize("items,message", [
    (["thresholds"], "is not NAME=V1,V2"),
    (["speeds=1,2"], "unknown grid name 'speeds'"),
    (["caches=none,lru"], "unknown cache 'lru'"),
    (["strategies=greedy"], "unknown strategy 'greedy'"),
    (["thresholds=0.7,high"], "grid threshold: 'high' is not a number"),
    (["thresholds=1.5"], "threshold must be in (0, 1]"),
    (["block-lengths=8", "block_length=16"], "grid names 'block_length' twice"),
    (["steps=8,8"], "repeats a value"),
])
def test_bad_grids(items, message):
    with pytest.raises(InvalidParameterError) as info:
        parse_grid(items)
    assert message in str(info.value)


def test_expansion_baseline_and_options_per_strategy():
    base = EvalConfig(task="arith", sampling={"max_tokens": 64, "steps": 32})
    axes = parse_grid(["strategies=threshold,reference", "caches=dual", "thresholds=0.7,0.9"])
    plan = expand(base, axes, "llada")
    assert [name for name, _ in plan] == ["reference/none", "threshold/dual threshold=0.7",
                                          "threshold/dual threshold=0.9", "reference/dual"]
    baseline = plan[0][1]
    assert (baseline.strategy, baseline.cache, baseline.sampling) == ("reference", "none", {"max_tokens": 64, "steps": 32})
    assert plan[1][1].sampling == {"max_tokens": 64, "threshold": 0.7}  # steps: the reference sampler's only
    assert label(plan[3][1], axes) == "reference/dual"


def test_pareto_front_by_hand():
    points = [(10.0, 0.9), (20.0, 0.8), (15.0, 0.7), (20.0, 0.8), (5.0, 0.95), (30.0, None), (25.0, 0.5)]
    assert pareto_front(points) == [True, True, False, True, True, False, True]


def test_bad_grid_cli_is_one_line(capsys):
    assert main(["bench", "--task", "arith", "--grid", "thresholds=0.7,x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: grid threshold: 'x' is not a number"]


def test_bench_two_by_two(tmp_path):
    cmd = [sys.executable, "-m", "dllm.cli", "bench", "--task", "arith", "--limit", "4", "--max-tokens", "64",
           "--steps", "16", "--threshold", "0.9", "--device", "cpu", "--no-progress", "--output", str(tmp_path),
           "--grid", "strategies=reference,threshold", "caches=none,block"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    bench = json.loads((tmp_path / "bench.json").read_text())
    rows = {row["setting"]: row for row in bench["rows"]}
    assert list(rows) == ["reference/none", "threshold/none"] and rows["reference/none"]["baseline"]
    base = rows["reference/none"]["metrics"]["throughput"]
    for row in rows.values():
        assert row["speedup"] == pytest.approx(row["metrics"]["throughput"] / base)
        assert row["metrics"]["num_samples"] == 4 and (tmp_path / row["dir"] / "samples.jsonl").is_file()
    assert rows["reference/none"]["config"]["sampling"] == {"max_tokens": 64, "steps": 16}
    assert rows["threshold/none"]["config"]["sampling"] == {"max_tokens": 64, "threshold": 0.9}
    assert [x["setting"] for x in bench["refused"]] == ["reference/block", "threshold/block"]
    assert all("cache 'block' needs block_causal attention" in x["reason"] for x in bench["refused"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["reference-none", "threshold-none"]
    table = (tmp_path / "bench.md").read_text()
    assert "| reference/none (baseline) |" in table and "1.00x" in table and "- threshold/block: cache 'block'" in table
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in table and not (tmp_path / "pareto.png").exists()
    assert json.loads(r.stdout.splitlines()[-1])["refused"] == bench["refused"]
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)  # resumes: nothing to decode
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == bench["rows"]

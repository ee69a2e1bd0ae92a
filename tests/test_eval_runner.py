"""The evaluation runner (`eval/runner.py`) and its metrics on the bundled tiny-llada (CPU): records, summary and
report of a small run; resuming after a failure and after a real kill without regenerating finished samples;
refusing another setting in the same directory; metric definitions checked by hand; one-line CLI errors."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from dllm import LLM, SamplingParams
from dllm.cli import main
from dllm.eval import metrics
from dllm.eval.runner import EvalConfig, EvalError, run, sample_seed, truncate
from dllm.eval.tasks import get_task, to_messages

# One thread, as conftest.py sets in-process: on a shared or busy machine a second thread of a tiny model only
# spins (8x slower here under load).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
PARAMS = SamplingParams(max_tokens=128, threshold=0.9)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-llada", strategy="threshold", device="cpu", max_batch_size=4)


class Counting:
    """The LLM, counting the prompts it is asked to decode; raises after `fail_after` calls (a crash)."""

    def __init__(self, llm, fail_after: int | None = None):
        self.llm, self.fail_after, self.calls, self.prompts = llm, fail_after, 0, 0
        self.spec, self.engine, self.check_prompt = llm.spec, llm.engine, llm.check_prompt

    def chat(self, conversations, params):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise RuntimeError("injected crash")
        self.calls, self.prompts = self.calls + 1, self.prompts + len(conversations)
        return self.llm.chat(conversations, params)


def config(**kw) -> EvalConfig:
    return EvalConfig(**{"task": "arith", "strategy": "threshold", "batch_size": 4, "device": "cpu",
                         "sampling": PARAMS, **kw})


def lines(path) -> list[dict]:
    """The complete records (a line cut short by a kill has no newline yet)."""
    complete = (path / "samples.jsonl").read_bytes().rpartition(b"\n")[0]
    return [json.loads(line) for line in complete.splitlines()]


def test_small_run_records_summary_report(llm, tmp_path):
    summary = run(config(), tmp_path, limit=8, progress=False, llm_factory=lambda c: llm)
    records = lines(tmp_path)
    problems = get_task("arith").generate("test", 8)
    want = llm.chat([to_messages(p) for p in problems], PARAMS)  # the public API on the same prompts
    assert [r["doc_id"] for r in records] == [p.task_id for p in problems]
    assert [r["generation"] for r in records] == [o.text for o in want]
    assert [r["tokens"] for r in records] == [o.metrics.num_tokens for o in want]
    assert [r["correct"] for r in records] == [get_task("arith").check(p, o.text) for p, o in zip(problems, want)]
    assert all(r["prompt"] == o.prompt and r["sample"] == 0 for r, o in zip(records, want))
    m = summary.metrics
    assert m["num_samples"] == 8 and m["accuracy"] == sum(r["correct"] for r in records) / 8
    assert m["total_tokens"] == sum(r["tokens"] for r in records)
    assert m["throughput"] == pytest.approx(m["total_tokens"] / sum({r["batch"]: r["batch_seconds"] for r in records}.values()))
    assert m["peak_gpu_memory_gib"] is None and summary.environment["device"] == "cpu"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["metrics"] == m and saved["setting"]["sampling"] == {  # canonical: the defaults written out
        "max_tokens": 128, "threshold": 0.9, "block_length": 32, "temperature": 0.0}
    assert saved["setting"]["chat"] is True and "tokens" in saved["definitions"]
    assert "| accuracy (primary) |" in (tmp_path / "report.md").read_text()


def test_resume_after_a_crash_and_a_torn_line(llm, tmp_path):
    first = Counting(llm, fail_after=1)
    with pytest.raises(RuntimeError, match="injected crash"):
        run(config(), tmp_path, limit=8, progress=False, warmup=False, llm_factory=lambda c: first)
    done = (tmp_path / "samples.jsonl").read_bytes()
    assert first.prompts == 4 and len(done.splitlines()) == 4  # the first batch was written before the crash
    with open(tmp_path / "samples.jsonl", "ab") as f:
        f.write(b'{"doc_id": "Arith/4", "sam')  # a write cut short by a kill
    second = Counting(llm)
    summary = run(config(), tmp_path, limit=8, progress=False, warmup=False, llm_factory=lambda c: second)
    assert second.prompts == 4  # only the unfinished docs were decoded again
    data = (tmp_path / "samples.jsonl").read_bytes()
    assert data.startswith(done) and len(data.splitlines()) == 8
    records = lines(tmp_path)
    assert [r["doc_id"] for r in records] == [f"Arith/{i}" for i in range(8)]
    assert len({r["session"] for r in records}) == 2 and summary.metrics["num_samples"] == 8
    third = Counting(llm)
    assert run(config(), tmp_path, limit=8, progress=False, llm_factory=lambda c: third).metrics == summary.metrics
    assert third.calls == 0


def test_resume_after_kill(tmp_path):
    """The real command, killed (SIGKILL) once records appear, then run again to the end."""
    args = [sys.executable, "-m", "dllm.cli", "eval", "--task", "arith", "--limit", "4", "--batch-size", "1",
            "--max-tokens", "64", "--strategy", "reference", "--steps", "16", "--device", "cpu", "--output", str(tmp_path), "--no-progress"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples, deadline = tmp_path / "samples.jsonl", time.time() + 120
    while time.time() < deadline and not (samples.is_file() and samples.read_bytes().count(b"\n") >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [r["doc_id"] for r in lines(tmp_path)]
    assert 1 <= len(before) < 4, "the run finished before it could be killed"
    r = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    records = lines(tmp_path)
    assert [x["doc_id"] for x in records] == [f"Arith/{i}" for i in range(4)]
    sessions = [x["session"] for x in records]
    assert len(set(sessions[:len(before)])) == 1 and set(sessions[len(before):]).isdisjoint(sessions[:len(before)])
    assert json.loads(r.stdout.splitlines()[-1])["metrics"]["num_samples"] == 4


def test_another_setting_is_refused_unless_overwritten(llm, tmp_path):
    run(config(), tmp_path, limit=2, progress=False, llm_factory=lambda c: llm)
    other = config(sampling=SamplingParams(max_tokens=64, threshold=0.9))
    with pytest.raises(EvalError, match=r"holds a run with another setting \(sampling.max_tokens 128 there, 64 now\)"):
        run(other, tmp_path, limit=2, progress=False, llm_factory=lambda c: llm)
    summary = run(other, tmp_path, limit=2, overwrite=True, progress=False, llm_factory=lambda c: llm)
    assert summary.metrics["num_samples"] == 2 and len(lines(tmp_path)) == 2


def test_samples_are_seeded_per_doc_and_index(llm, tmp_path):
    sampled = config(num_samples=2, sampling=SamplingParams(max_tokens=64, threshold=0.9, temperature=1.0))
    a = run(sampled, tmp_path / "a", limit=2, progress=False, llm_factory=lambda c: llm)
    b = run(sampled, tmp_path / "b", limit=2, progress=False, llm_factory=lambda c: Counting(llm))
    ra, rb = lines(tmp_path / "a"), lines(tmp_path / "b")
    assert [(r["doc_id"], r["sample"]) for r in ra] == [("Arith/0", 0), ("Arith/0", 1), ("Arith/1", 0), ("Arith/1", 1)]
    assert [r["generation"] for r in ra] == [r["generation"] for r in rb]
    assert len({r["seed"] for r in ra}) == 4 and ra[1]["seed"] == sample_seed(0, "Arith/0", 1)
    assert "prompt" in ra[0] and "prompt" not in ra[1] and ra[0]["prompt_sha1"] == ra[1]["prompt_sha1"]
    assert a.metrics["num_docs"] == 2 and b.metrics["num_samples"] == 4
    with pytest.raises(EvalError, match="needs temperature > 0"):
        run(config(num_samples=2), tmp_path / "c", limit=1, progress=False, llm_factory=lambda c: llm)


def test_metric_definitions_by_hand():
    def rec(tokens, nfe, seconds, batch, batch_seconds, session="s", session_seconds=0.0, correct=True):
        return {"doc_id": f"d{tokens}", "correct": correct, "tokens": tokens, "nfe": nfe, "seconds": seconds,
                "batch": batch, "batch_seconds": batch_seconds, "session": session,
                "session_seconds": session_seconds, "peak_memory_bytes": None}
    records = [rec(10, 5, 1.0, "a", 2.0, session_seconds=3.0), rec(20, 5, 2.0, "a", 2.0, session_seconds=3.5),
               rec(30, 10, 3.0, "b", 4.0, "t", 1.0, correct=False), rec(40, 20, 4.0, "b", 4.0, "t", 5.0)]
    m = metrics.summarize(records, {})
    assert m["accuracy"] == 0.75 and m["num_docs"] == 4
    assert m["tokens_per_second"] == pytest.approx((10 / 1 + 20 / 2 + 30 / 3 + 40 / 4) / 4)  # 10.0
    assert m["throughput"] == pytest.approx(100 / 6.0)       # batch a (2 s) and b (4 s), each counted once
    assert m["tokens_per_forward"] == pytest.approx(100 / 40) and m["nfe"] == 10
    assert m["latency_p50_s"] == pytest.approx(2.5)          # between 2 and 3
    assert m["latency_p95_s"] == pytest.approx(3.85)         # rank 0.95 * 3 = 2.85: 3 + 0.85 * (4 - 3)
    assert m["generation_seconds"] == 6.0 and m["wall_seconds"] == 3.5 + 5.0
    assert metrics.percentile([7.0], 95) == 7.0 and metrics.percentile([], 50) is None
    assert truncate("answer\n\nQuestion: next", ["Question:", "\n\n"]) == ("answer", True)
    assert truncate("answer", ["Question:"]) == ("answer", False)


@pytest.mark.parametrize("args,message", [
    (["--task", "gsm9k"], "error: unknown eval task 'gsm9k'; choose one of: gsm8k, humaneval, arith"),
    (["--task", "gsm8k", "--data-file", "/nonexistent/test.jsonl"], "/nonexistent/test.jsonl does not exist"),
    (["--task", "arith", "--num-fewshot", "3"], "task 'arith' has no option 'num_fewshot'"),
    (["--task", "arith", "--num-samples", "0"], "num_samples must be an integer >= 1"),
    (["--task", "arith", "--task-option", "oops"], "--task-option 'oops' is not KEY=VALUE"),
])
def test_bad_inputs_are_one_line(capsys, args, message):
    assert main(["eval", *args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cli_error_exit_status(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dllm.cli", "eval", "--task", "gsm9k"], env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: unknown eval task 'gsm9k'; choose one of: gsm8k, humaneval, arith, gsm-lite, code-lite"]


DATA = pathlib.Path(__file__).parent / "data" / "gsm8k" / "test.jsonl"


def eval_cli(*args) -> list[str]:
    return ["eval", "--device", "cpu", "--no-progress", *args]


def test_a_prompt_that_does_not_fit_is_skipped_and_counted(tmp_path, capsys):
    """One shot: gsm8k/0's prompt (582 tokens) does not fit the 512-token model; the other three are decoded."""
    out = tmp_path / "run"
    assert main(eval_cli("--task", "gsm8k", "--data-file", str(DATA), "--num-fewshot", "1", "--max-tokens", "64",
                         "--output", str(out))) == 0
    err = capsys.readouterr().err
    assert "skipped 1 sample(s) whose prompt does not fit, e.g. gsm8k/0: prompt of 582 tokens" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["num_skipped"] == 1 and summary["metrics"]["num_samples"] == 3
    (skipped,) = summary["skipped"]
    assert skipped["doc_id"] == "gsm8k/0" and "exceeds the model's context of 512 tokens" in skipped["reason"]
    assert "try --num-fewshot 0" in skipped["reason"]
    assert [r["doc_id"] for r in lines(out)] == ["gsm8k/0", "gsm8k/1", "gsm8k/2", "gsm8k/3"]
    report = (out / "report.md").read_text()
    assert "## Skipped: 1 sample(s), not in the metrics" in report and "| skipped (prompt does not fit) | 1 |" in report


def test_no_prompt_fits_is_one_line_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(eval_cli("--task", "gsm8k", "--data-file", str(DATA), "--output", str(out))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no prompt of the 4 to decode fits, e.g. gsm8k/0")
    assert "5 worked examples make the prompt long: try --num-fewshot 0" in err[0]
    assert not out.exists()


def test_spelled_out_defaults_resume_the_same_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    quick = ("--task", "arith", "--limit", "2", "--max-tokens", "64")
    assert main(eval_cli(*quick)) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[-1])["output_dir"]
    spelled = ("--strategy", "factor", "--cache", "freecache", "--factor", "1.0", "--block-length", "32", "--chat",
               "--temperature", "0")
    assert main(eval_cli(*quick, *spelled)) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["output_dir"] == first
    assert f"resuming {first}: 2 of 2 samples already recorded, 0 to decode" in captured.err
    assert main(eval_cli(*quick, "--strategy", "reference")) == 0       # another setting: another directory
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["output_dir"] != first

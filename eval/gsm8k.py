"""GSM8K (Cobbe et al. 2021): grade-school math word problems, scored on the final number.

Data: a local JSONL file of `{"question", "answer"}` records (`data_file`: the test split; the few-shot
examples come from `train_file`, by default `train.jsonl` beside it), else `datasets.load_dataset(
"openai/gsm8k", "main")`. Both are openai/grade-school-math's data; that the hub keeps the JSONL files'
record order, which the few-shot draw depends on, was not checked offline.

Prompts mirror lm-evaluation-harness's `gsm8k` task (EleutherAI/lm-evaluation-harness @ 4e7e0d4,
`lm_eval/tasks/gsm8k/gsm8k.yaml`, `lm_eval/api/task.py`, `samplers.py`; unchanged since v0.4.8):
- text: `Question: {question}\\nAnswer:`, target `{answer}` (the whole worked solution, ending `#### N`),
  target delimiter " ", few-shot delimiter "\\n\\n"; 5 shots from the train split;
- shots: lm-eval's default sampler is one `random.Random(1234)` (its `fewshot_random_seed`) on which
  `sample(train, k)` is called once per test document, in document order; `fewshot_indices` replays it,
  so document i gets the shots lm-eval gives it whatever `limit` is;
- chat (`--apply_chat_template`): lm-eval up to 0.4.9 sends the whole few-shot text, ending in the
  question's `Answer:`, as one user turn (what Fast-dLLM's published numbers use); from 0.4.10 its CLI
  defaults to `fewshot_as_multiturn`, one user/assistant pair per shot. `fewshot_as_multiturn` picks;
  the default is the single turn;
- stops: `Question:`, `</s>`, `<|im_end|>`, in both modes.
The text, single-turn and multi-turn prompts of the first test documents were compared with lm-eval
0.4.13's own (`build_all_requests` on the same JSONL files): identical.
`cot_zeroshot=True` is a zero-shot chat variant in the spirit of lm-eval's `gsm8k_cot_zeroshot`: the
question followed by `COT_INSTRUCTION`, which asks for the reasoning and a last line `#### <number>`, so
the same strict extraction applies (lm-eval's own variant asks for "The answer is N." instead).

Scores: `correct` is the strict `####` answer (`eval/scoring.py`), `flexible_correct` lm-eval's
flexible-extract; `aggregate` gives `strict_accuracy` and `flexible_accuracy`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from dllm.errors import DatasetUnavailableError, InvalidParameterError
from dllm.eval.harness_tasks import Doc, mean_of
from dllm.eval.scoring import extract_flexible, extract_strict, is_correct

FEWSHOT_SEED = 1234                 # lm-eval's default fewshot_random_seed (lm_eval/defaults.py)
STOP_SEQUENCES = ["Question:", "</s>", "<|im_end|>"]
COT_INSTRUCTION = ('Solve the problem step by step. End your response with a last line of the form "#### N", '
                   "where N is the final answer as a number.")
_DATA_HINT = "pass --data-file with a local GSM8K test JSONL ({question, answer} records)"


def read_jsonl(path: Path) -> list[dict]:
    """GSM8K records from a JSONL file, checked for the two fields."""
    if not path.is_file():
        raise DatasetUnavailableError(f"GSM8K data file {path} does not exist; {_DATA_HINT}")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for i, r in enumerate(records):
        if not (isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)):
            raise DatasetUnavailableError(f"{path}: record {i} is not a GSM8K record ({{question, answer}})")
    return records


def load_split(split: str) -> list[dict]:
    """One split of `openai/gsm8k` ("main") through `datasets`."""
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailableError(f"GSM8K is not available: `datasets` is not installed; {_DATA_HINT}")
    try:
        rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
    except Exception as err:        # offline, hub errors: the message says what to do instead
        raise DatasetUnavailableError(f"GSM8K could not be loaded through `datasets` ({err}); {_DATA_HINT}") from err
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def gold_answer(answer: str) -> str:
    """The final answer of a worked solution: the text after its last `####`."""
    return answer.rsplit("####", 1)[-1].strip()


def fewshot_indices(num_docs: int, num_train: int, k: int, seed: int = FEWSHOT_SEED) -> list[list[int]]:
    """The train indices of the `k` shots of each of the first `num_docs` documents, as lm-eval draws them."""
    rng = random.Random(seed)
    return [rng.sample(range(num_train), k) for _ in range(num_docs)]


def question_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def fewshot_text(shots: list[dict], question: str) -> str:
    """The completion-mode prompt: each shot, its answer after " ", shots apart by a blank line."""
    return "".join(f"{question_text(s['question'])} {s['answer']}\n\n" for s in shots) + question_text(question)


class Gsm8kTask:
    """The `EvalTask` for GSM8K (see `eval/harness_tasks.py` and the module docstring)."""

    primary_metric = "strict_accuracy"

    def __init__(self, data_file: str | Path | None = None, train_file: str | Path | None = None,
                 num_fewshot: int | None = None, cot_zeroshot: bool = False, fewshot_as_multiturn: bool = False,
                 seed: int = FEWSHOT_SEED) -> None:
        if cot_zeroshot and num_fewshot:
            raise InvalidParameterError("cot_zeroshot is zero-shot: leave num_fewshot unset or 0")
        num_fewshot = (0 if cot_zeroshot else 5) if num_fewshot is None else num_fewshot
        if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
            raise InvalidParameterError(f"num_fewshot must be a non-negative int, got {num_fewshot!r}")
        self.name = "gsm8k-cot-zeroshot" if cot_zeroshot else "gsm8k"
        # Appended to the reason a prompt does not fit the model: the worked examples are most of its length.
        self.fit_hint = (f"; {num_fewshot} worked examples make the prompt long: try --num-fewshot 0 (or fewer)"
                         if num_fewshot else "")
        self.default_chat, self.cot_zeroshot = cot_zeroshot, cot_zeroshot
        self.fewshot_as_multiturn = fewshot_as_multiturn
        test = read_jsonl(Path(data_file)) if data_file is not None else load_split("test")
        train = self._train(data_file, train_file) if num_fewshot else []
        shots = fewshot_indices(len(test), len(train), num_fewshot, seed)  # num_fewshot 0: empty lists
        self._docs = [Doc(f"gsm8k/{i}", {**r, "fewshot": [train[j] for j in idx]})
                      for i, (r, idx) in enumerate(zip(test, shots))]

    @staticmethod
    def _train(data_file, train_file) -> list[dict]:
        if train_file is not None:
            return read_jsonl(Path(train_file))
        if data_file is None:
            return load_split("train")
        beside = Path(data_file).with_name("train.jsonl")
        if not beside.is_file():
            raise DatasetUnavailableError(f"GSM8K few-shot examples come from the train split: put train.jsonl "
                                          f"beside {data_file}, pass train_file, or set num_fewshot=0")
        return read_jsonl(beside)

    def docs(self, limit: int | None = None) -> list[Doc]:
        return self._docs[:limit]

    def prompt(self, doc: Doc, chat: bool) -> str | list[dict]:
        question, shots = doc.data["question"], doc.data["fewshot"]
        if self.cot_zeroshot:
            text = f"{question}\n{COT_INSTRUCTION}"
            return [{"role": "user", "content": text}] if chat else question_text(text)
        if not chat:
            return fewshot_text(shots, question)
        if not self.fewshot_as_multiturn:
            return [{"role": "user", "content": fewshot_text(shots, question)}]
        turns = [[{"role": "user", "content": question_text(s["question"])},
                  {"role": "assistant", "content": s["answer"]}] for s in shots]
        return [m for pair in turns for m in pair] + [{"role": "user", "content": question_text(question)}]

    def stop_sequences(self, chat: bool) -> list[str]:
        return list(STOP_SEQUENCES)

    def score(self, doc: Doc, completion: str) -> dict:
        gold, strict = gold_answer(doc.data["answer"]), extract_strict(completion)
        return {"correct": is_correct(strict, gold), "extracted": strict,
                "flexible_correct": is_correct(extract_flexible(completion), gold)}

    def aggregate(self, records: list[dict]) -> dict:
        return {"strict_accuracy": mean_of(records, "correct"),
                "flexible_accuracy": mean_of(records, "flexible_correct")}

"""GSM8K and the text zoo tasks through the harness contract (CPU, fast): gold solutions score 100%, wrong
answers 0, and the prompts are lm-evaluation-harness's `gsm8k` format. The few-shot indices below are the
ones lm-eval 0.4.13 (`build_all_requests` with its default fewshot seed 1234) gives the first two test
documents of the full data set; lm-eval's own sampler checks them again, and draws the shots of the committed
10-problem excerpt (`conftest.gsm8k_dir`: 4 test, 6 train problems)."""
from __future__ import annotations

import json

import pytest

from dllm.errors import DatasetUnavailableError, InvalidParameterError
from dllm.eval.gsm8k import COT_INSTRUCTION, FEWSHOT_SEED, fewshot_indices
from dllm.eval.harness_tasks import EVAL_TASKS, get_eval_task

LM_EVAL_SHOTS = {0: [6374, 3610, 957, 61, 742], 1: [7462, 6610, 4769, 286, 5501]}
FULL_TRAIN_SIZE = 7473


def lm_eval_shots(train: list, num_docs: int, k: int = 5) -> list[list]:
    """The shots lm-eval's own default sampler draws for the first `num_docs` test documents, in order."""
    from lm_eval.api.samplers import ContextSampler
    sampler = ContextSampler(train, rnd=FEWSHOT_SEED)
    return [list(sampler.sample(k)) for _ in range(num_docs)]


@pytest.fixture(scope="module")
def records(gsm8k_dir):
    def read(split):
        return [json.loads(line) for line in (gsm8k_dir / f"{split}.jsonl").read_text().splitlines()]
    return read("test"), read("train")


@pytest.fixture(scope="module")
def gsm8k(gsm8k_dir):
    return get_eval_task("gsm8k", data_file=str(gsm8k_dir / "test.jsonl"))


def test_gold_solutions_score_100_percent(gsm8k):
    docs = gsm8k.docs()
    assert len(docs) == 4 and docs[3].doc_id == "gsm8k/3"
    records = [{"doc_id": d.doc_id, **gsm8k.score(d, d.data["answer"])} for d in docs]
    assert gsm8k.aggregate(records) == {"strict_accuracy": 1.0, "flexible_accuracy": 1.0}
    assert all(isinstance(r["extracted"], str) for r in records)


def test_wrong_answers_score_0(gsm8k):
    doc = gsm8k.docs(1)[0]          # the first test doc; its gold answer is 18
    wrong = ["#### 19", "The answer is 17.\n#### 17", "She makes $18 but #### 81", "I do not know.", "#### eighteen",
             "#### 1.8"]
    records = [{"doc_id": doc.doc_id, **gsm8k.score(doc, w)} for w in wrong]
    assert gsm8k.aggregate(records) == {"strict_accuracy": 0.0, "flexible_accuracy": 0.0}
    loose = gsm8k.score(doc, "She makes 9 * 2 = $18 a day.")    # no `####`: strict fails, flexible passes
    assert (loose["correct"], loose["extracted"], loose["flexible_correct"]) == (False, None, True)
    assert gsm8k.score(doc, "so #### $18.00")["correct"]


def test_fewshot_indices_are_lm_evals_on_the_full_train_split():
    full = list(range(FULL_TRAIN_SIZE))
    assert fewshot_indices(2, FULL_TRAIN_SIZE, 5) == lm_eval_shots(full, 2) == [LM_EVAL_SHOTS[0], LM_EVAL_SHOTS[1]]


def test_fewshot_prompt_is_lm_eval_format(gsm8k, records):
    test, train = records
    drawn = lm_eval_shots(train, 2)
    for i, doc in enumerate(gsm8k.docs(2)):
        shots = drawn[i]
        expected = ""
        for s in shots:
            expected += "Question: " + s["question"] + "\nAnswer: " + s["answer"] + "\n\n"
        expected += "Question: " + test[i]["question"] + "\nAnswer:"
        assert gsm8k.prompt(doc, chat=False) == expected
    first = gsm8k.prompt(gsm8k.docs(1)[0], chat=False)      # doc 0 with its five shots, read from the data
    assert first.startswith("Question: " + drawn[0][0]["question"] + "\nAnswer: ")
    assert first.endswith(drawn[0][-1]["answer"] + "\n\nQuestion: " + test[0]["question"] + "\nAnswer:")
    assert gsm8k.stop_sequences(chat=False) == gsm8k.stop_sequences(chat=True) == ["Question:", "</s>", "<|im_end|>"]
    assert gsm8k.default_chat is False and gsm8k.primary_metric == "strict_accuracy"


def test_fewshot_does_not_depend_on_limit_and_seed_changes_it(gsm8k, gsm8k_dir):
    assert gsm8k.docs(3) == gsm8k.docs()[:3]
    other = get_eval_task("gsm8k", data_file=str(gsm8k_dir / "test.jsonl"), seed=7, num_fewshot=2)
    doc = other.docs(1)[0]
    assert len(doc.data["fewshot"]) == 2 and other.prompt(doc, False).count("Question:") == 3
    assert other.prompt(doc, False) != gsm8k.prompt(gsm8k.docs(1)[0], False)


def test_chat_wrapping(gsm8k, gsm8k_dir, records):
    first_shot = lm_eval_shots(records[1], 1)[0][0]
    doc = gsm8k.docs(1)[0]
    text = gsm8k.prompt(doc, chat=False)
    assert gsm8k.prompt(doc, chat=True) == [{"role": "user", "content": text}]
    multiturn = get_eval_task("gsm8k", data_file=str(gsm8k_dir / "test.jsonl"), fewshot_as_multiturn=True)
    messages = multiturn.prompt(doc, chat=True)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 5 + ["user"]
    assert messages[0]["content"] == f"Question: {first_shot['question']}\nAnswer:"
    assert messages[1]["content"] == first_shot["answer"]
    assert messages[-1]["content"] == f"Question: {doc.data['question']}\nAnswer:"
    assert multiturn.prompt(doc, chat=False) == text


def test_cot_zeroshot(gsm8k_dir):
    task = get_eval_task("gsm8k", data_file=str(gsm8k_dir / "test.jsonl"), cot_zeroshot=True)
    doc = task.docs(1)[0]
    question = doc.data["question"]
    assert task.name == "gsm8k-cot-zeroshot" and task.default_chat is True and doc.data["fewshot"] == []
    assert task.prompt(doc, chat=True) == [{"role": "user", "content": f"{question}\n{COT_INSTRUCTION}"}]
    assert task.prompt(doc, chat=False) == f"Question: {question}\n{COT_INSTRUCTION}\nAnswer:"
    assert '"#### N"' in COT_INSTRUCTION
    assert task.score(doc, "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18")["correct"]
    with pytest.raises(InvalidParameterError, match="zero-shot"):
        get_eval_task("gsm8k", data_file=str(gsm8k_dir / "test.jsonl"), cot_zeroshot=True, num_fewshot=5)


def test_data_errors(tmp_path, records):
    test, _ = records
    lone = tmp_path / "only_test.jsonl"
    lone.write_text("".join(json.dumps(r) + "\n" for r in test[:4]))
    with pytest.raises(DatasetUnavailableError, match="train.jsonl"):
        get_eval_task("gsm8k", data_file=str(lone))
    zero = get_eval_task("gsm8k", data_file=str(lone), num_fewshot=0)
    assert zero.prompt(zero.docs()[0], False) == f"Question: {test[0]['question']}\nAnswer:"
    with pytest.raises(DatasetUnavailableError, match="--data-file"):
        get_eval_task("gsm8k", data_file=str(tmp_path / "missing.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q"}\n')
    with pytest.raises(DatasetUnavailableError, match="record 0"):
        get_eval_task("gsm8k", data_file=str(broken), num_fewshot=0)
    with pytest.raises(InvalidParameterError, match="num_fewshot"):
        get_eval_task("gsm8k", data_file=str(lone), num_fewshot=-1)


def test_registry_names_and_option_errors():
    assert EVAL_TASKS == ("gsm8k", "humaneval", "arith", "gsm-lite", "code-lite")
    with pytest.raises(InvalidParameterError, match="choose one of: gsm8k, humaneval, arith, gsm-lite, code-lite"):
        get_eval_task("mmlu")
    with pytest.raises(InvalidParameterError, match="no option 'shots'"):
        get_eval_task("gsm8k", shots=5)
    with pytest.raises(InvalidParameterError, match="calculator"):
        get_eval_task("gsm-lite", num_asserts=3)


@pytest.mark.parametrize("name", ["arith", "gsm-lite"])
def test_zoo_text_tasks_through_the_contract(name):
    task = get_eval_task(name)
    docs = task.docs(5)
    assert docs == get_eval_task(name).docs(5) and len(task.docs()) == 1000
    assert task.name == name and task.default_chat is True and task.primary_metric == "accuracy"
    doc = docs[0]
    assert task.prompt(doc, chat=True) == [{"role": "user", "content": doc.data["prompt"]}]
    assert task.prompt(doc, chat=False) == doc.data["prompt"] and task.stop_sequences(True) == []
    gold, wrong = task.score(doc, doc.data["target"]), task.score(docs[1], "#### -1")
    assert (gold["correct"], gold["extracted"]) == (True, doc.data["answer"]) and not wrong["correct"]
    assert task.aggregate([{"doc_id": doc.doc_id, **gold}, {"doc_id": docs[1].doc_id, **wrong}]) == {"accuracy": 0.5}

"""The generated tasks (arith, gsm-lite, code-lite), GSM8K answer scoring and the zoo tokenizer (CPU, fast).

Oracles independent of the generators: Python evaluates every worked arithmetic line and calculator
annotation; code-lite's expected values come from separate oracle functions and are checked by running the
canonical bodies; the tokenizer is checked token by token over its whole vocabulary.
"""
from __future__ import annotations

import json
import re
import statistics
from concurrent.futures import ThreadPoolExecutor

import pytest

from dllm.eval.scoring import extract_flexible, extract_strict, is_correct, normalize_number
from dllm.eval.tasks import TASKS, get_task, humaneval_record, to_messages
from dllm.eval.tasks.code_families import FAMILIES
from dllm.eval.tasks.execution import run_program

NUM_TRAIN = 2000


@pytest.fixture(scope="module", params=list(TASKS))
def task(request):
    return get_task(request.param)


def test_registry_names_and_unknown_task():
    assert set(TASKS) == {"arith", "gsm-lite", "code-lite"}
    with pytest.raises(ValueError, match="arith, gsm-lite, code-lite"):
        get_task("gsm8k")


def test_generate_rejects_bad_arguments(task):
    with pytest.raises(ValueError, match="train, test"):
        task.generate("validation", 3)
    with pytest.raises(ValueError, match="non-negative"):
        task.generate("train", -1)
    with pytest.raises(ValueError, match="at most"):
        task.generate("test", task.test_pool_size + 1)


def test_generation_is_deterministic_and_extends(task):
    fresh = type(task)()
    for split in ("train", "test"):
        assert task.generate(split, 50) == fresh.generate(split, 50)
        assert fresh.generate(split, 80)[:50] == task.generate(split, 50)


def test_train_and_test_are_disjoint(task):
    test = task.generate("test", task.test_pool_size)
    train = task.generate("train", NUM_TRAIN)
    assert len({task.key(p) for p in test}) == len(test)
    assert not {p.prompt for p in test} & {p.prompt for p in train}
    assert not {task.key(p) for p in test} & {task.key(p) for p in train}
    ids = [p.task_id for p in test + train]
    assert len(set(ids)) == len(ids) and test[3].task_id == f"{task.id_prefix}/3"


def test_checker_accepts_gold_and_rejects_wrong(task):
    for p in task.generate("test", 20 if task.name == "code-lite" else 200):
        assert task.check(p, p.target), p
        if task.name != "code-lite":
            wrong = p.target.rsplit("#### ", 1)[0] + f"#### {int(p.answer) + 1}"
            assert not task.check(p, wrong)
            assert not task.check(p, p.target.rsplit("#### ", 1)[0])      # no final answer line
            assert task.check(p, f"so the answer is\n#### {p.answer}")


def _worked_equations(target: str) -> list[tuple[str, int]]:
    """(expression, stated value) for every `lhs = value` line of a worked solution."""
    found = re.findall(r"^([0-9+\-* ]+) = (\d+),", target, flags=re.M)
    return [(lhs, int(value)) for lhs, value in found]


def test_arith_worked_lines_are_right():
    for p in get_task("arith").generate("test", 1000):
        op, a, b = p.meta["op"], p.meta["a"], p.meta["b"]
        assert p.prompt == f"What is {a} {op} {b}?" and int(p.answer) == eval(f"{a} {op} {b}")
        equations = _worked_equations(p.target)
        assert equations and all(eval(lhs) == value for lhs, value in equations), p.target
        last = p.target.splitlines()
        assert last[-1] == f"#### {p.answer}" and int(last[-2].rsplit(": ", 1)[1]) == int(p.answer)


def test_gsm_lite_annotations_are_right():
    task = get_task("gsm-lite")
    for p in task.generate("test", 1000):
        notes = re.findall(r"(\d+ [-+*/] \d+) = <<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)", p.target)
        assert len(notes) == len(p.target.splitlines()) - 1 >= 2, p.target
        for shown, a, op, b, value, copied in notes:
            assert shown == f"{a} {op} {b}" and value == copied
            assert eval(f"{a} {op} {b}") == int(value) > 0
        assert notes[-1][4] == p.answer and extract_flexible(p.target) == p.answer
    plain = type(task)(calculator=False).generate("test", 5)
    assert all("<<" not in p.target and task.check(p, p.target) for p in plain)


def _run_in_process(task, problem, completion: str) -> bool:
    try:
        exec(task.program(problem, completion), {})
        return True
    except Exception:       # a failed assert, or the buggy body raising
        return False


def test_code_lite_records_and_canonical_solutions_pass():
    task = get_task("code-lite")
    test, train = task.generate("test", task.test_pool_size), task.generate("train", NUM_TRAIN)
    for p in test + train:        # our own canonical code: in-process is safe and fast
        record = humaneval_record(p)
        assert set(record) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
        assert record["prompt"].startswith(f"def {record['entry_point']}(") and record["prompt"].endswith('"""\n')
        assert re.fullmatch(r"    return [^\n]+\n", p.target) and p.answer == p.target
        assert _run_in_process(task, p, p.target), (p.prompt, p.target, record["test"])
    with ThreadPoolExecutor(8) as pool:     # and the real subprocess checker on a sample
        assert all(pool.map(lambda p: task.check(p, p.target), test[:40]))


def _off_by_one(consts: tuple) -> dict:
    """Every constant nudged: numbers + 1, letters to the next letter, separators to another one."""
    bumped = {}
    for key, value in consts:
        if isinstance(value, int):
            bumped[key] = value + 1
        elif len(value) == 1 and value.isalpha():
            bumped[key] = chr((ord(value) - ord("a") + 1) % 26 + ord("a"))
        else:
            bumped[key] = value + "_"
    return bumped


def test_code_lite_rejects_buggy_bodies():
    task = get_task("code-lite")
    variants = {v.stem: v for vs in FAMILIES.values() for v in vs}
    problems = task.generate("test", task.test_pool_size)
    assert not any(_run_in_process(task, p, "    return None\n") for p in problems)
    caught = 0
    for p in problems:      # the right function with its constants off by one: the asserts must notice
        arg = re.match(r"def \w+\((\w+):", p.prompt).group(1)
        body = variants[p.meta["variant"]].body.format(x=arg, **_off_by_one(p.meta["consts"]))
        caught += not _run_in_process(task, p, f"    return {body}\n")
    assert caught >= 0.95 * len(problems), caught
    with ThreadPoolExecutor(8) as pool:
        assert not any(pool.map(lambda p: task.check(p, "    return None\n"), problems[:8]))


def test_code_lite_variants_have_distinct_stems_and_constants():
    stems = [v.stem for variants in FAMILIES.values() for v in variants]
    assert len(stems) == len(set(stems))
    import random
    rng = random.Random(0)
    for variants in FAMILIES.values():
        for v in variants:
            assert len({tuple(sorted(v.draw_consts(rng).items())) for _ in range(500)}) >= 19, v.stem


def test_run_program_reports_failures_and_timeouts():
    assert run_program("print('ok')\n").passed
    failed = run_program("raise SystemExit(3)\n")
    assert not failed.passed and failed.returncode == 3
    slow = run_program("while True:\n    pass\n", timeout_s=0.5)
    assert slow.timed_out and not slow.passed
    isolated = run_program("import os, sys\nassert 'HOME' not in os.environ and sys.flags.isolated\n")
    assert isolated.passed, isolated.stderr_tail
    with pytest.raises(ValueError):
        run_program("pass\n", timeout_s=0)


def test_scoring_extraction_and_comparison():
    assert extract_strict("a\n#### 12\nthen #### $1,234.") == "1234"
    assert extract_strict("#### -7") == "-7" and extract_strict("no answer 5") is None
    assert extract_strict("#### 5\n#### five") is None and extract_strict("####12") == "12"
    assert extract_flexible("3 + 4 = 7, so 7.") == "7" and extract_flexible("none") is None
    assert extract_flexible("It costs $1,000.50 in total") == "1000.50"
    assert normalize_number(" $2,500. ") == "2500"
    assert is_correct("12.0", "12") and is_correct("1,000", "1000") and not is_correct("13", "12")
    assert not is_correct(None, "12")


def test_to_messages():
    p = get_task("arith").generate("test", 1)[0]
    assert to_messages(p) == [{"role": "user", "content": p.prompt}]
    assert to_messages(p, include_target=True)[1] == {"role": "assistant", "content": p.target}


# ---- the zoo tokenizer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_tokenizer(tmp_path_factory):
    """The shipped tokenizer (default corpus and vocab), saved and reloaded through AutoTokenizer."""
    from transformers import AutoTokenizer

    from dllm.zoo.tokenizer import build_zoo_tokenizer, save_tokenizer
    path = tmp_path_factory.mktemp("zoo-tokenizer")
    save_tokenizer(build_zoo_tokenizer(), path)
    return path, AutoTokenizer.from_pretrained(path)


def test_tokenizer_files_and_special_tokens(zoo_tokenizer):
    from dllm.zoo.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS
    path, tok = zoo_tokenizer
    assert sorted(f.name for f in path.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                      "tokenizer_config.json"]
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert len(tok) == 1024
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t, add_special_tokens=False) == [i]
        assert tok.encode(f"7{t}x", add_special_tokens=False)[1] == i
    assert (tok.eos_token, tok.pad_token, tok.mask_token, tok.bos_token) == \
        ("<|endoftext|>", "<|endoftext|>", "<|mask|>", "<|beginoftext|>")
    assert tok.encode("12", add_special_tokens=True) == tok.encode("12", add_special_tokens=False)


def test_tokenizer_digits_are_single_tokens(zoo_tokenizer):
    _, tok = zoo_tokenizer
    for i in range(len(tok)):
        text = tok.decode([i])
        assert not any(ch.isdigit() for ch in text) or (len(text) == 1), (i, text)
    assert tok.encode("1234567890", add_special_tokens=False) == [tok.convert_tokens_to_ids(d) for d in "1234567890"]


def test_tokenizer_round_trips_task_texts(zoo_tokenizer):
    _, tok = zoo_tokenizer
    for name in TASKS:
        task = get_task(name)
        problems = task.generate("test", task.test_pool_size) + task.generate("train", NUM_TRAIN)
        for p in problems:
            for text in (p.prompt, p.target):
                assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    text = "  odd\tspacing\n\n  ünïcode → ✓ 3.14 <<2*3=6>>\r\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template_renders_chatml(zoo_tokenizer):
    _, tok = zoo_tokenizer
    p = get_task("gsm-lite").generate("test", 1)[0]
    prompt = tok.apply_chat_template(to_messages(p), tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template(to_messages(p, include_target=True), tokenize=False)
    assert full == f"<|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n{p.target}<|im_end|>\n"
    assert tok.apply_chat_template(to_messages(p), tokenize=False) == f"<|im_start|>user\n{p.prompt}<|im_end|>\n"
    ids = tok.apply_chat_template(to_messages(p, include_target=True), tokenize=True, return_dict=False)
    assert ids == tok.encode(full, add_special_tokens=False) and tok.decode(ids) == full
    assert ids.count(2) == 2 and ids.count(3) == 2


def test_typical_lengths_fit_the_context(zoo_tokenizer):
    """Chat-rendered prompt + target (what a training row holds before padding) stays well under 200."""
    _, tok = zoo_tokenizer
    for name in TASKS:
        task = get_task(name)
        problems = task.generate("test", task.test_pool_size)
        lengths = [len(tok.apply_chat_template(to_messages(p, include_target=True), tokenize=True, return_dict=False))
                   for p in problems]
        targets = [len(tok.encode(p.target, add_special_tokens=False)) for p in problems]
        print(f"{name}: chat prompt+target max {max(lengths)} mean {statistics.mean(lengths):.1f}; "
              f"target max {max(targets)} mean {statistics.mean(targets):.1f}")
        assert max(lengths) <= 160 and max(targets) <= 120

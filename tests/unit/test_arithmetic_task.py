"""The arithmetic word-problem task: generator (scripts/arithmetic_task.py), hold-outs, scoring."""

import re
import sys
from pathlib import Path

import pytest

from nemodiff_train.eval import scoring
from nemodiff_train.eval.tasks import ArithmeticTask, Sample, get_task

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import arithmetic_task as arith  # noqa: E402

LINE = re.compile(r"so (\w+) has (\d+) ([-+*]) (\d+) = (\d+) (\w+ \w+)\.$")


def _check_solution(p: "arith.Problem") -> None:
    """Every worked line's arithmetic is right and chains into the next; the answer is the last value."""
    lines = p.solution.splitlines()
    assert lines[-1] == f"#### {p.answer}"
    value = None
    for line in lines[:-1]:
        m = LINE.search(line)
        if m is None:
            assert line.endswith(" starts with " + line.split(" starts with ")[1])
            value = int(line.split(" starts with ")[1].split()[0])
            continue
        a, op, b, r = int(m[2]), m[3], int(m[4]), int(m[5])
        assert r == {"+": a + b, "-": a - b, "*": a * b}[op]
        if op != "*":
            assert a == value, "each step starts from the previous result"
        value = r
    assert value == p.answer and 1 <= p.answer <= arith.MAX_VALUE


def test_generation_is_deterministic_and_correct():
    a = arith.generate_problems(300, "train", seed=1)
    assert a == arith.generate_problems(300, "train", seed=1)
    assert a != arith.generate_problems(300, "train", seed=2)
    for p in a + arith.generate_problems(100, "test", seed=1):
        _check_solution(p)


def test_test_split_holds_out_templates_values_names_and_objects():
    train = arith.generate_problems(2000, "train", seed=1) + arith.generate_problems(200, "val", seed=1)
    test = arith.generate_problems(200, "test", seed=1)
    assert not {p.template for p in train} & set(arith.HELD_OUT_TEMPLATES)
    assert len(arith.TEMPLATES) == 12 and set(arith.HELD_OUT_TEMPLATES) < set(arith.TEMPLATES)
    held = sum(p.template in arith.HELD_OUT_TEMPLATES for p in test)
    assert 0.35 < held / len(test) < 0.65
    assert not set(arith.TEST_NAMES) & set(arith.NAMES) and not set(arith.TEST_OBJECTS) & set(arith.OBJECTS)
    assert len(arith.NAMES) > 300 and len(arith.OBJECTS) > 200  # too many to memorise: copy them
    first_word = lambda ps: {p.solution.split()[0] for p in ps}  # noqa: E731  (the solver's name)
    assert first_word(train) <= set(arith.NAMES) and first_word(test) <= set(arith.TEST_NAMES)
    assert all(any(o in p.question for o in arith.TEST_OBJECTS) for p in test)
    starts = lambda ps: [int(p.solution.split(" starts with ")[1].split()[0]) for p in ps  # noqa: E731
                         if " starts with " in p.solution]
    assert all(10 <= v <= 69 for v in starts(train)) and all(70 <= v <= 89 for v in starts(test))
    assert not {p.question for p in train} & {p.question for p in test}


def test_answer_extraction_follows_lm_eval_gsm8k():
    assert scoring.strict_answer("x = 3.\n#### 1,234") == "1234"
    assert scoring.strict_answer("the answer is 12") is None
    assert scoring.flexible_answer("so 4 + 5 = 9 apples.") == "9"
    assert scoring.flexible_answer("none") is None


def test_arithmetic_task_scores_the_final_answer():
    task = ArithmeticTask(limit=3)
    assert len(task.samples()) == 3 and task.name == "arithmetic" and task.primary_metric == "exact_match"
    s = Sample("q", "A has 2 + 3 = 5 x.\n#### 5", {"answer": "5"})
    assert task.score(s, "A has 2 + 3 = 5 x.\n#### 5")["exact_match"] == 1.0
    wrong = task.score(s, "A has 2 + 3 = 6 x.\n#### 6")
    assert wrong["exact_match"] == 0.0 and wrong["flexible_match"] == 0.0
    no_marker = task.score(s, "A has 2 + 3 = 5 x.")
    assert no_marker["exact_match"] == 0.0 and no_marker["flexible_match"] == 1.0
    assert isinstance(get_task("arithmetic"), ArithmeticTask)


def test_shipped_test_file_matches_the_generator():
    rows = ArithmeticTask().samples()
    assert len(rows) == 200
    for row in rows:
        assert row.reference.endswith(f"#### {row.meta['answer']}")
        assert row.meta["held_out_template"] == (row.meta["template"] in arith.HELD_OUT_TEMPLATES)
    with pytest.raises(FileNotFoundError, match="build_embedded_model"):
        ArithmeticTask(path=ArithmeticTask().path.parent / "missing.jsonl").samples()

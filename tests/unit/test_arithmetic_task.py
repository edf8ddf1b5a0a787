"""The arithmetic word-problem task: generator (scripts/arithmetic_task.py), hold-outs, scoring."""

import re
import sys
from pathlib import Path

import pytest

from nemodiff_train.tasks import scoring
from nemodiff_train.tasks import ArithmeticTask, Sample, get_task

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import arithmetic_task as arith  # noqa: E402

LINE = re.compile(r", so (\d+) ([-+*]) (\d+) = (\d+)\.$")


def _sentences(question: str) -> list[str]:
    """The question's sentences, each with its final full stop."""
    return [s + "." for s in question.rstrip(".?").replace("?", ".").split(". ")]


def _check_solution(p: "arith.Problem") -> None:
    """Each line restates the question's next sentence, its arithmetic is right and chains into the
    next line; the answer is the last value."""
    lines = p.solution.splitlines()
    assert lines[-1] == f"#### {p.answer}"
    sentences = _sentences(p.question)
    assert len(sentences) == len(lines), "one line per sentence, the closing question's line is ####"
    value = None
    for line, sentence in zip(lines[:-1], sentences):
        m = LINE.search(line)
        if m is None:  # a plain start: the sentence itself, holding the starting value
            assert line == sentence
            value = int(re.search(r"\d+", line)[0])
            continue
        assert line[: m.start()] + "." == sentence, "the line restates its sentence word for word"
        a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
        assert r == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert op == "*" or a == value, "each step starts from the previous result"
        verb = {"+": " gets ", "-": " loses ", "*": None}[op]
        assert verb is None or verb in sentence, "the operator follows from the sentence's verb"
        assert re.findall(r"\d+", sentence) == ([str(a), str(b)] if op == "*" else [str(b)])
        value = r
    assert value == p.answer and 1 <= p.answer <= arith.MAX_VALUE
    links = [line.split()[0].rstrip(",") for line in lines[1:-1]]
    assert len(set(links)) == len(links) and set(links) <= {w.split()[0].rstrip(",") for w in arith.LINKS}


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
    solver = lambda ps: {re.search(r"\b(" + "|".join(arith.NAMES + arith.TEST_NAMES) + r")\b", p.solution)[1]  # noqa: E731
                         for p in ps}
    assert solver(train) <= set(arith.NAMES) and solver(test) <= set(arith.TEST_NAMES)
    assert all(any(o in p.question for o in arith.TEST_OBJECTS) for p in test)
    starts = lambda ps: [int(re.search(r"\d+", p.solution)[0]) for p in ps  # noqa: E731
                         if p.template.startswith("start-")]
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


def test_evaluator_warns_when_the_budget_cuts_the_answer_off(caplog):
    """Exact match reads the final ``#### n``: a max_new_tokens below the references' length would
    score those rows 0 without a word, so the evaluator says how many references it cuts."""
    from types import SimpleNamespace

    from nemodiff_train.assets import embedded_model_dir
    from nemodiff_train.eval.runner import EvalConfig, Evaluator
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    ev = lambda budget: SimpleNamespace(tokenizer=tok, cfg=EvalConfig(  # noqa: E731
        model="m", out="o", task=["arithmetic", "code_completion"], limit=10, max_new_tokens=budget))
    with caplog.at_level("WARNING", logger="nemodiff_train.eval.runner"):
        Evaluator.load_task(ev(20), "arithmetic")
        assert "10 of 10 references have >= max_new_tokens=20" in caplog.text
        caplog.clear()
        Evaluator.load_task(ev(200), "arithmetic")
        Evaluator.load_task(ev(20), "code_completion")  # token accuracy compares a budget's worth
        assert "references have" not in caplog.text

"""Task loading, rendering and scoring of the evaluator on hand-written examples."""

from __future__ import annotations

import json

import pytest

from nemodiff_train.tasks import scoring
from nemodiff_train.tasks import CODE_COMPLETION_FILE, CodeCompletionTask, Sample, Task, get_task
from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

pytestmark = pytest.mark.unit

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
BODY = "    total = a + b\n    return total\n"


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_first_nonempty_line_and_exact_match():
    assert scoring.first_nonempty_line("\n  \n   x = 1  \ny") == "x = 1"
    assert scoring.first_nonempty_line(" \n") == ""
    assert scoring.exact_match("  hello\n", "hello") == 1.0
    assert scoring.exact_match("hello!", "hello") == 0.0


def test_token_accuracy_is_positionwise_over_the_reference():
    assert scoring.token_accuracy("a b c", "a b c") == 1.0
    assert scoring.token_accuracy("a x c d e", "a b c") == pytest.approx(2 / 3)  # extra output is free
    assert scoring.token_accuracy("a", "a b c d") == pytest.approx(1 / 4)  # missing tokens count
    assert scoring.token_accuracy("b c", "a b c") == 0.0  # shifted = wrong positions
    assert scoring.token_accuracy("", "") == 1.0
    assert scoring.token_accuracy("a b", "a b c d", budget=2) == 1.0


def test_token_accuracy_uses_the_given_encoder(tok):
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    ref = "The quick brown fox"
    assert scoring.token_accuracy(ref, ref, encode) == 1.0
    n = len(encode(ref))
    assert scoring.token_accuracy("The quick", ref, encode) == pytest.approx(len(encode("The quick")) / n)


def test_cut_at_function_end():
    assert scoring.cut_at_function_end(BODY + "\ndef other():\n    pass\n") == BODY + "\n"
    assert scoring.cut_at_function_end(BODY) == BODY
    assert scoring.cut_at_function_end("print(1)\n    x = 2\n") == ""


@pytest.mark.parametrize("body, valid", [
    (BODY, 1.0),
    (BODY + "def next_function(:\n", 1.0),  # junk after the function end is cut off
    ("    return (a +\n", 0.0),  # unbalanced parenthesis
    ("    return a\n  b = 2\n", 0.0),  # inconsistent dedent
    ("", 0.0),  # empty body: valid Python, but nothing was written
    ("\n\n", 0.0),
])
def test_ast_valid(body, valid):
    assert scoring.ast_valid(PROMPT, body) == valid


def test_code_completion_scores(tmp_path, tok):
    path = _write(tmp_path / "cc.jsonl", [{"prompt": PROMPT, "reference": BODY, "source": "m.py", "name": "add"}])
    task = CodeCompletionTask(path, tokenizer=tok)
    (sample,) = task.samples()
    assert sample.meta == {"source": "m.py", "name": "add"}
    assert task.score(sample, BODY) == {"first_line_exact": 1.0, "token_accuracy": 1.0, "ast_valid": 1.0}
    partial = task.score(sample, "    total = a + b\n    return (\n")
    assert partial["first_line_exact"] == 1.0 and partial["ast_valid"] == 0.0
    assert 0.0 < partial["token_accuracy"] < 1.0
    wrong = task.score(sample, "\n    return a - b\n")
    assert wrong == {"first_line_exact": 0.0, "token_accuracy": wrong["token_accuracy"], "ast_valid": 1.0}
    assert task.metric_names == ("first_line_exact", "token_accuracy", "ast_valid")


def test_jsonl_task_scores_and_limit(tmp_path, tok):
    path = _write(tmp_path / "qa.jsonl", [{"prompt": f"q{i}", "reference": f"answer {i}"} for i in range(5)])
    task = get_task(str(path), tokenizer=tok, limit=3)
    assert isinstance(task, Task) and task.name == "qa"
    assert [s.prompt_text for s in task.samples()] == ["q0", "q1", "q2"]
    s = task.samples()[1]
    assert task.score(s, " answer 1\n") == {"exact_match": 1.0, "token_accuracy": pytest.approx(1.0)}
    assert task.score(s, "nope")["exact_match"] == 0.0


def test_render_uses_chat_template_when_present(tok, tmp_path):
    path = _write(tmp_path / "qa.jsonl", [{"prompt": "Hello world", "reference": "x"}])
    sample = Sample("Hello world", "x")
    chat = get_task(str(path)).render(tok, sample)
    expected = tok.apply_chat_template([{"role": "user", "content": "Hello world"}], tokenize=False,
                                       add_generation_prompt=True)
    assert tok.decode(chat) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    raw = get_task(str(path), chat_template=False).render(tok, sample)
    assert tok.decode(raw) == "Hello world"


def test_get_task_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        get_task(str(tmp_path / "missing.jsonl"))
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: row lacks field\(s\) \['reference'\]"):
        get_task(str(bad)).samples()


@pytest.mark.skipif(not CODE_COMPLETION_FILE.is_file(), reason="bundled task data not built")
def test_bundled_references_score_perfectly():
    task = get_task("code_completion", limit=20)  # no tokenizer: whitespace-word token accuracy
    for s in task.samples():
        assert s.prompt_text.startswith(("def ", "async def ")) and s.prompt_text.endswith("\n")
        assert task.score(s, s.reference) == {"first_line_exact": 1.0, "token_accuracy": 1.0, "ast_valid": 1.0}

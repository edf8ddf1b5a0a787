"""Grade-school arithmetic word problems with worked solutions, generated offline (stdlib only).

The embedded model's second task (``scripts/build_embedded_model.py`` writes its data): a story
states a starting quantity and one or two changes, and the answer is a worked solution in
GSM8K's format, one line per sentence of the story, ending in ``#### <answer>``::

    Question: Kara has 23 red apples. Then Kara gets 4 more. Later Kara loses 9 red apples to Lomo.
              How many red apples does Kara have now?
    Solution: Kara has 23 red apples.
              Then Kara gets 4 more, so 23 + 4 = 27.
              Later Kara loses 9 red apples to Lomo, so 27 - 9 = 18.
              #### 18

Why this task: most solution tokens are fixed by the question (each line restates one sentence
of the story, then the running total, the operand and the operator follow from it) and only the
computed numbers need thought. That is the structure that lets the method's large models commit
several tokens per forward on worked maths, and a few-million-parameter model can learn it, so the
toolkit's speed-up shows on a CPU. Restating the sentence, link word included, is what makes the
copying learnable: a problem never uses a link word twice, so "which change comes next" is found
by looking up the sentence after the previous one, the way an induction head copies text, instead
of by counting occurrences of "gets".

Held out for the test split (so its accuracy measures generalisation, not recall):

* templates: two of the twelve operation chains never occur in training (``add, add`` after a plain
  start, ``add, sub`` after a product start), half of the test rows;
* value range: plain starting quantities are 10..69 in train/val and 70..89 in test;
* names and objects: combinations (``Kara``, ``red apples``) of which 15 % are held out for test.

Every function is deterministic given its ``seed``; nothing depends on Python's salted ``hash``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

__all__ = ["Problem", "generate_problems", "chat_row", "plain_text", "test_row", "TEMPLATES", "HELD_OUT_TEMPLATES"]

# Names and objects are combinations, so that the model must copy them from the question rather
# than recall a few memorised ones; the test split uses combinations that training never shows.
NAME_HEADS = ["Ka", "Lo", "Mi", "Sa", "Te", "Ri", "No", "Be", "Da", "Fi", "Ja", "Ku", "Le", "Ma", "Pe",
              "Ro", "Si", "Tu", "Va", "Zo"]
NAME_TAILS = ["ra", "len", "mo", "ti", "san", "vi", "do", "na", "rek", "li", "ta", "bo", "mir", "ne", "ko",
              "lu", "fa", "ge", "ris", "wen"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "pink", "brown", "orange", "purple"]
NOUNS = ["apples", "marbles", "stickers", "pencils", "books", "cookies", "coins", "stamps", "shells", "cards",
         "balloons", "buttons", "beads", "candles", "tickets", "cups", "rocks", "kites", "socks", "hats",
         "boxes", "pens", "toys", "bricks", "leaves", "flags", "bells", "rings", "plates", "ribbons"]
CONTAINERS = ["bags", "jars", "packs", "baskets", "crates"]
TEST_SHARE = 15  # percent of name and object combinations held out for the test split


def _held_out(key: str) -> bool:
    """Whether a name / object combination belongs to the test split (a stable hash, not ``hash``)."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100 < TEST_SHARE


NAMES = [h + t for h in NAME_HEADS for t in NAME_TAILS if not _held_out(h + t)]
TEST_NAMES = [h + t for h in NAME_HEADS for t in NAME_TAILS if _held_out(h + t)]
OBJECTS = [f"{c} {n}" for c in COLOURS for n in NOUNS if not _held_out(f"{c} {n}")]
TEST_OBJECTS = [f"{c} {n}" for c in COLOURS for n in NOUNS if _held_out(f"{c} {n}")]

# Operation chains: a start ("start" = a plain quantity, "mul" = k containers of n each), then one
# or two changes. Two chains are held out for the test split; each of their parts occurs in training.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "-".join((first,) + changes): (first,) + changes
    for first in ("start", "mul")
    for changes in (("add",), ("sub",), ("add", "add"), ("add", "sub"), ("sub", "add"), ("sub", "sub"))
}
HELD_OUT_TEMPLATES = ("start-add-add", "mul-add-sub")
TRAIN_START = (10, 69)
TEST_START = (70, 89)
CHANGE = (1, 9)
MAX_VALUE = 99

# Question phrasings ({n} name, {o} object, {f} friend, {c} container). An event names its
# operation with one verb ("gets" adds, "loses" subtracts); the phrasing varies around it (link
# words, the opening sentence, who the items come from or go to, the closing question). Every
# sentence ends in "." and holds at most the numbers of its own operation.
START_Q = ["{n} has {x} {o}.", "{n} collected {x} {o}.", "There are {x} {o} in {n}'s room."]
MUL_Q = ["{n} has {k} {c} with {m} {o} in each.", "{n} buys {k} {c} of {o}, and each holds {m}."]
ADD_Q = ["{n} gets {y} more {o}.", "{n} gets {y} more {o} from {f}.", "{n} gets {y} more."]
SUB_Q = ["{n} loses {y} {o}.", "{n} loses {y} of the {o}.", "{n} loses {y} {o} to {f}."]
LINKS = ["Then", "Later", "After that,", "Next,"]
FINAL_Q = ["How many {o} does {n} have now?", "How many {o} does {n} have at the end?"]


@dataclass(frozen=True)
class Problem:
    """One generated problem: the question, the worked solution, the answer and its provenance."""

    question: str
    solution: str
    answer: int
    template: str
    split: str


def _make(rng: random.Random, template: str, split: str) -> Problem | None:
    """Draw one problem of ``template``; None when the draw leaves the value range (caller retries)."""
    test = split == "test"
    name, friend = rng.sample(TEST_NAMES if test else NAMES, 2)
    obj = rng.choice(TEST_OBJECTS if test else OBJECTS)
    ops = TEMPLATES[template]
    q: list[str] = []
    s: list[str] = []
    links = rng.sample(LINKS, len(ops) - 1)  # never twice in one problem: see the module docstring
    if ops[0] == "start":
        value = rng.randint(*(TEST_START if test else TRAIN_START))
        sentence = rng.choice(START_Q).format(n=name, x=value, o=obj)
        q.append(sentence)
        s.append(sentence)
    else:
        k, m, box = rng.randint(2, 9), rng.randint(2, 9), rng.choice(CONTAINERS)
        value = k * m
        sentence = rng.choice(MUL_Q).format(n=name, k=k, m=m, o=obj, c=box)
        q.append(sentence)
        s.append(f"{sentence[:-1]}, so {k} * {m} = {value}.")
    for op, link in zip(ops[1:], links):
        y = rng.randint(*CHANGE)
        new = value + y if op == "add" else value - y
        if not 1 <= new <= MAX_VALUE:
            return None
        sentence = f"{link} " + rng.choice(ADD_Q if op == "add" else SUB_Q).format(n=name, y=y, o=obj, f=friend)
        q.append(sentence)
        s.append(f"{sentence[:-1]}, so {value} {'+' if op == 'add' else '-'} {y} = {new}.")
        value = new
    q.append(rng.choice(FINAL_Q).format(n=name, o=obj))
    s.append(f"#### {value}")
    return Problem(" ".join(q), "\n".join(s), value, template, split)


def generate_problems(count: int, split: str, seed: int) -> list[Problem]:
    """``count`` problems of ``split`` (``train``, ``val`` or ``test``), deterministic given ``seed``.

    train/val use the six seen templates; test draws half its rows from the held-out templates.
    Exact duplicates (same question) are dropped, and test questions never occur in train/val
    because their names, objects and start values come from disjoint pools.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    rng = random.Random(f"arithmetic:{split}:{seed}")
    seen_templates = [t for t in TEMPLATES if t not in HELD_OUT_TEMPLATES]
    out: list[Problem] = []
    questions: set[str] = set()
    while len(out) < count:
        if split == "test" and rng.random() < 0.5:
            template = rng.choice(HELD_OUT_TEMPLATES)
        else:
            template = rng.choice(seen_templates)
        problem = _make(rng, template, split)
        if problem is None or problem.question in questions:
            continue
        questions.add(problem.question)
        out.append(problem)
    return out


def chat_row(p: Problem) -> dict[str, Any]:
    """An SFT row: the user asks the question, the assistant writes the worked solution."""
    return {"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.solution}],
            "source": f"arithmetic:{p.template}"}


def plain_text(p: Problem) -> str:
    """Pretraining text of one problem (question, blank line, solution)."""
    return f"{p.question}\n\n{p.solution}\n"


def test_row(p: Problem) -> dict[str, Any]:
    """A held-out evaluation row (``nemodiff-eval task=arithmetic``)."""
    return {"prompt": p.question, "reference": p.solution, "answer": str(p.answer), "template": p.template,
            "held_out_template": p.template in HELD_OUT_TEMPLATES}

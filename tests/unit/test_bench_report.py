"""nemodiff-bench's crossover: the first batch size at which a self-speculation mode stops beating AR."""

import pytest

from nemodiff_train.bench.report import crossovers, describe_crossover

pytestmark = pytest.mark.unit


def rows(table: dict[str, list[float]], sizes=(1, 4, 16, 64)):
    return [{"mode": m, "batch_size": b, "tokens_per_s": {"median": v}} for m, vs in table.items()
            for b, v in zip(sizes, vs)]


def test_crossover_is_the_first_batch_not_beating_ar():
    got = crossovers(rows({"ar": [10, 40, 150, 500], "linear_spec": [20, 60, 140, 520],
                           "quadratic_spec": [30, 90, 200, 600], "hf_generate": [12, 45, 160, 550]}))
    # linear beats ar at 1 and 4, not at 16: the crossover is 16 (a later win at 64 does not move it)
    assert got["linear_spec"] == {"vs": "ar", "batch_size": 16, "beats_up_to": 4}
    assert got["quadratic_spec"] == {"vs": "ar", "batch_size": None, "beats_up_to": 64}
    assert "stops at batch 16" in describe_crossover(got["linear_spec"])
    assert "every batch size measured (up to 64)" in describe_crossover(got["quadratic_spec"])


def test_crossover_at_batch_one_and_missing_modes():
    got = crossovers(rows({"ar": [10, 40], "linear_spec": [10, 30]}, sizes=(1, 4)))
    assert got == {"linear_spec": {"vs": "ar", "batch_size": 1, "beats_up_to": None}}  # a tie does not beat
    assert "does not beat ar even at batch 1" in describe_crossover(got["linear_spec"])
    assert crossovers(rows({"linear_spec": [10]}, sizes=(1,))) == {}  # no ar row: nothing to compare with

"""95 % intervals of accuracies (eval/intervals.py) against published Wilson values and the normal interval."""

import math

import pytest

from nemodiff_train.eval.intervals import mean_interval, metric_intervals, wilson_interval

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("k, n, expected", [
    (7, 10, (0.3968, 0.8922)),    # Wilson 95 %: the textbook example values
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (64, 100, (0.5424, 0.7273)),   # by hand: centre 0.6348, half-width 0.0925
])
def test_wilson_matches_published_values(k, n, expected):
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(expected[0], abs=1e-4) and high == pytest.approx(expected[1], abs=1e-4)


def test_graded_metric_gets_the_normal_interval_of_the_mean():
    values = [0.2, 0.5, 0.9, 0.4, 0.6]
    mean = sum(values) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    low, high = mean_interval(values)
    assert low == pytest.approx(mean - 1.959964 * sd / math.sqrt(5)) and high == pytest.approx(mean + 1.959964 * sd / math.sqrt(5))


def test_binary_values_use_wilson_and_rows_are_named():
    per_sample = [{"exact_match": 1.0, "token_accuracy": 0.5}, {"exact_match": 0.0, "token_accuracy": 1.0}]
    out = metric_intervals(per_sample, ["exact_match", "token_accuracy"])
    assert out["exact_match_ci95"] == [round(x, 6) for x in wilson_interval(1, 2)]
    assert set(out) == {"exact_match_ci95", "token_accuracy_ci95"}
    with pytest.raises(ValueError):
        mean_interval([])

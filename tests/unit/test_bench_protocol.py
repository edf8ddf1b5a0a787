"""The interleaved timing protocol (nemodiff_train/timing.py) and the forward counter of
nemodiff-bench: call order, what is timed and kept, and the shapes the decoders use."""

import pytest

from nemodiff_train.timing import TimedRun, run_interleaved, spread
from nemodiff_train.bench.runner import BenchConfig, BenchError, ShapeCounter
from nemodiff_train.decoding import DecodeConfig, generate
from tests.helpers.decoding import one_thread, tiny_lm  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.unit


def test_runs_take_turns_chunk_by_chunk_after_untimed_warmups():
    calls = []

    def recorder(name):
        def call(chunk):
            calls.append((name, tuple(p[0] for p in chunk)))
            return [name] * len(chunk)
        return call

    runs = [TimedRun("batched", recorder("batched"), chunk=2), TimedRun("single", recorder("single"), chunk=1)]
    prompts = [[1], [2], [3], [4]]
    run_interleaved(runs, prompts, repeats=2, warmups=1)
    warm, timed = calls[:2], calls[2:]
    assert warm == [("batched", (1, 2)), ("single", (1,))]
    one_pass = [("batched", (1, 2)), ("single", (1,)), ("single", (2,)),
                ("batched", (3, 4)), ("single", (3,)), ("single", (4,))]
    assert timed == one_pass * 2
    for run in runs:
        assert len(run.seconds) == 2 and all(isinstance(s, float) for s in run.seconds)  # one per repeat
        assert run.results == [run.name] * 4  # the last repeat only


def test_spread_and_bad_arguments():
    s = spread([2.0, 1.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 4.0, 3)
    assert s["rel_spread"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="no prompts"):
        run_interleaved([TimedRun("x", lambda c: c)], [])
    with pytest.raises(ValueError, match="repeats"):
        run_interleaved([TimedRun("x", lambda c: c)], [[1]], repeats=0)


def test_shape_counter_sees_every_forward_by_batch_and_query_length():
    lm = tiny_lm("qwen3", tie=False, initializer_range=1.0)
    B = 4
    for mode, expect_q in (("ar", {1}), ("linear_spec", {B}), ("quadratic_spec", {B, B * (B + 1)})):
        counter = ShapeCounter(lm)
        res = generate(counter, [[5, 6, 7]], mode, DecodeConfig(max_new_tokens=4 * B, block_size=B))[0]
        prefill = {k: n for k, n in counter.counts.items() if k[2]}
        assert prefill == {(1, 3, True): 1}
        rest = {k: n for k, n in counter.counts.items() if not k[2]}
        assert sum(rest.values()) == res.stats.forwards
        # tail blocks may be shorter than B (never beyond max_new_tokens)
        assert expect_q <= {q for _, q, _ in rest} <= set(range(1, B * (B + 1) + 1))


def test_config_errors_name_the_key():
    with pytest.raises(BenchError, match="exactly one of model"):
        BenchConfig()
    with pytest.raises(BenchError, match="shape="):
        BenchConfig(shape="gpt-5")
    with pytest.raises(BenchError, match="batch_sizes"):
        BenchConfig(shape="embedded", batch_sizes=[0])
    with pytest.raises(BenchError, match="cache"):
        BenchConfig(shape="embedded", cache="paged")

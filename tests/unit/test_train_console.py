"""What training prints: a header and a bar per stage, validation lines when computed, a smoothed loss,
plain lines (no carriage returns or escape codes) when the output is not a terminal; and the data
report's wording of length-limit drops as the policy they are."""

from __future__ import annotations

import io
import json
import sys

import pytest

from nemodiff_train.data.report import OVER_LONG_TOKENS, BAD_JSON, SkipReport, report_lines, skip_phrase
from nemodiff_train.engines.torch.metrics import SMOOTHING, LossEMA, MetricsSink

pytestmark = pytest.mark.unit

LOSSES = {1: 6.0, 2: 5.0, 3: 7.0, 4: 4.0, 5: 4.5, 6: 3.5}


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _reference_ema(values):
    s = w = 0.0
    for x in values:
        s, w = SMOOTHING * s + (1 - SMOOTHING) * x, SMOOTHING * w + (1 - SMOOTHING)
    return s / w


def _two_stages(sink: MetricsSink) -> None:
    """Steps 1-3 pretrain (validation at 0 and 2), 4-6 sft (validation at 3), then a message."""
    for name, index, first, last in (("pretrain", 0, 0, 3), ("sft", 1, 3, 6)):
        sink.start_stage(name, index, 2, first, last, first, detail="8 rows x 128 tokens per step")
        sink.log({"step": first, "stage": name, "val_ar_loss": 4.25, "val_diffusion_loss": 14.5})
        for step in range(first + 1, last + 1):
            sink.log({"step": step, "stage": name, "loss": LOSSES[step], "ar_loss": 3.0, "diffusion_loss": 9.0,
                      "lr": 5e-4, "tokens_per_s": 1000.0})
            sink.progress(step, {"loss": LOSSES[step], "tok/s": 1000.0})
            if step == 2:
                sink.log({"step": 2, "stage": name, "val_ar_loss": 4.125, "val_diffusion_loss": 12.0,
                          "val_masked_token_accuracy": 0.25, "probe_diffusion_tpf": 1.0, "probe_linear_spec_tpf": 1.5,
                          "probe_diffusion_exact_match": 0.25, "probe_linear_spec_exact_match": 0.5,
                          "probe_linear_spec_lossless": 1.0})
        sink.end_stage()
    sink.message("exported runs/x/hf")
    sink.close()


def test_loss_ema_is_bias_corrected():
    ema = LossEMA()
    assert ema.update(5.0) == 5.0  # the first value as it is, not pulled towards 0
    assert ema.update(5.0) == pytest.approx(5.0)
    values = [5.0, 5.0, 9.0, 1.0, 4.0]
    for x in values[2:]:
        ema.update(x)
    assert ema.value == pytest.approx(_reference_ema(values))
    ema.update(float("nan"))  # a non-finite loss is not averaged in
    assert ema.value == pytest.approx(_reference_ema(values))


def test_plain_lines_when_not_a_terminal(tmp_path, capsys):
    stream = io.StringIO()  # not a tty: no bar
    _two_stages(MetricsSink(tmp_path, enabled=True, total_steps=6, start_step=0, progress_bar=True, stream=stream))
    out = capsys.readouterr().out
    assert stream.getvalue() == ""  # nothing drawn on the progress stream
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert lines[0] == "stage 1/2 pretrain: steps 1-3 (8 rows x 128 tokens per step)"
    assert lines[1] == "  step 0 validation (pretrain, the base model before training): AR loss 4.250, diffusion loss 14.500"
    assert lines[2].startswith("  pretrain step 1/3 | loss 6.000 (ema), last 6.000 | ar 3.000, diffusion 9.000")
    assert lines[3].startswith("  pretrain step 2/3 | loss 5.444 (ema), last 5.000")  # (0.8*.2*6 + .2*5) / (1-.64)
    assert lines[4] == ("  step 2 validation (pretrain): AR loss 4.125, diffusion loss 12.000, "
                        "masked-token accuracy 0.250")
    # the probe's TPF beside its task score (here exact match), never TPF alone
    assert lines[5] == "    decode probe (TPF, exact_match): diffusion 1.00 / 0.25, linear_spec 1.50 / 0.50"
    assert lines[7] == "stage 2/2 sft: steps 4-6 (8 rows x 128 tokens per step)"
    assert lines[8].startswith("  step 3 validation (sft, before this stage)")
    # the EMA restarts with the stage: the sft losses are on another scale
    assert lines[9].startswith("  sft step 1/3 | loss 4.000 (ema)")
    assert f"loss {_reference_ema([LOSSES[4], LOSSES[5], LOSSES[6]]):.3f} (ema)" in lines[11]
    assert lines[-1] == "exported runs/x/hf" and out.count("exported") == 1
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if "loss" in r] == list(LOSSES.values())  # raw values kept


def test_one_bar_per_stage_on_a_terminal(tmp_path, monkeypatch):
    stream, stdout = _Terminal(), _Terminal()
    monkeypatch.setattr(sys, "stdout", stdout)
    _two_stages(MetricsSink(tmp_path, enabled=True, total_steps=6, start_step=0, progress_bar=True, stream=stream))
    bars = stream.getvalue()
    assert "pretrain: 100%" in bars and "sft: 100%" in bars
    assert "6/6" not in bars  # stage-local counts, not one bar over both stages
    assert "\x1b[A" not in bars  # never a nested bar (cursor-up codes)
    final = [seg for seg in bars.split("\r") if "100%" in seg]
    assert "loss(ema)=" in final[-1]
    out = stdout.getvalue()
    assert "stage 2/2 sft" in out and "  step 2 validation (pretrain)" in out and "exported runs/x/hf" in out
    for line in out.splitlines():  # messages are whole lines, never glued to a bar
        assert "%|" not in line


def test_silent_on_other_ranks_and_without_progress(tmp_path, capsys):
    _two_stages(MetricsSink(tmp_path, enabled=False, total_steps=6, start_step=0, progress_bar=True,
                            stream=io.StringIO()))
    assert capsys.readouterr().out == ""
    _two_stages(MetricsSink(tmp_path, enabled=True, total_steps=6, start_step=0, progress_bar=False,
                            stream=io.StringIO()))
    out = capsys.readouterr().out
    assert "(ema)" not in out and "stage 2/2 sft" in out and "step 2 validation" in out


def test_resumed_stage_says_so(tmp_path, capsys):
    sink = MetricsSink(tmp_path, enabled=True, total_steps=6, start_step=4, progress_bar=False, stream=io.StringIO())
    sink.start_stage("sft", 1, 2, 3, 6, 4)
    sink.close()
    assert capsys.readouterr().out.strip() == "stage 2/2 sft: steps 4-6, resuming after step 4"


def test_length_limit_drops_read_as_policy_and_malformed_rows_as_errors():
    rep = SkipReport()
    for i in range(3):
        rep.skip(f"sft.jsonl:{i + 1}", OVER_LONG_TOKENS, f"{300 + i} tokens > seq_len=256")
    rep.skip("sft.jsonl:9", BAD_JSON, "Expecting value")
    assert skip_phrase(rep.counts, kind="sft", seq_len=256) == (
        "3 conversations longer than seq_len=256 tokens left out, 1 malformed rows skipped (bad-json 1)")
    lines = report_lines(rep.to_json(), kind="sft", seq_len=256, max_chars=None, meta_file="d/meta.json", examples=5)
    assert lines == ["3 conversations longer than seq_len=256 tokens left out, see d/meta.json",
                     "1 malformed rows skipped: bad-json 1",
                     "  sft.jsonl:9: bad-json (Expecting value)"]
    assert skip_phrase(SkipReport().counts, kind="sft", seq_len=256) == ""
    assert report_lines(SkipReport().to_json(), kind="pretrain", seq_len=8, max_chars=None, meta_file="m",
                        examples=5) == []

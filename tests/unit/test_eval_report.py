"""Evaluator plumbing without decoding: config checks, model-dir resolution, EOS ids, report files."""

from __future__ import annotations

import json

import pytest

from nemodiff_train.cli.evaluate import EvalConfigError, to_eval_config
from nemodiff_train.models.loading import resolve_model_dir
from nemodiff_train.models.stop_tokens import stop_token_ids
from nemodiff_train.eval.report import format_table, write_outputs
from nemodiff_train.decoding.modes import with_reference
from nemodiff_train.eval.runner import EvalConfig, SweepConfig
from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

pytestmark = pytest.mark.unit


def _row(mode, tpf, tps, acc, **extra):
    return {"mode": mode, "task": "t", "samples": 2, "generated_tokens": 10, "forwards": int(10 / tpf),
            "prefill_forwards": 2, "tpf": tpf, "tokens_per_s": tps, "exact_match": acc, "token_accuracy": acc,
            "metric_names": ["exact_match", "token_accuracy"], "primary_metric": "token_accuracy",
            "requested": True, "block_size": 4, "threshold": 0.9, "temperature": 0.0, "dtype": "float32",
            "device": "cpu", **extra}


def test_eval_config_defaults_and_checks():
    cfg = EvalConfig(model="m", out="o")
    assert cfg.modes == ["ar", "diffusion", "linear_spec", "quadratic_spec"]
    assert cfg.task == "code_completion" and cfg.max_new_tokens == 64 and cfg.block_size is None
    assert cfg.sweep.threshold == [0.5, 0.7, 0.9, 0.95] and cfg.sweep.block_size == []
    assert cfg.tasks == ["code_completion"]
    assert EvalConfig(model="m", out="o", task=["arithmetic", "code_completion"]).tasks == ["arithmetic",
                                                                                            "code_completion"]
    with pytest.raises(ValueError, match="task must be"):
        EvalConfig(model="m", out="o", task=[])
    with pytest.raises(ValueError, match="sweep.threshold"):
        EvalConfig(model="m", out="o", sweep=SweepConfig(threshold=[1.5]))
    with pytest.raises(ValueError, match=r"sweep.tasks names \['arithmetic'\]"):
        EvalConfig(model="m", out="o", sweep=SweepConfig(tasks=["arithmetic"]))
    with pytest.raises(ValueError, match="modes must be"):
        EvalConfig(model="m", out="o", modes=["ar", "beam"])
    with pytest.raises(ValueError, match="dtype"):
        EvalConfig(model="m", out="o", dtype="float16")
    with pytest.raises(ValueError, match="needs static_cache=true"):
        EvalConfig(model="m", out="o", compile=True, static_cache=False)
    with pytest.raises(ValueError, match="device=cpu"):
        EvalConfig(model="m", out="o", compile=True, device="cpu")


def test_to_eval_config_names_bad_keys():
    cfg = to_eval_config({"model": "m", "out": "o", "modes": ["ar"], "limit": 3, "sweep": {"threshold": []},
                          "task": ["arithmetic", "code_completion"]})
    assert cfg.modes == ["ar"] and cfg.limit == 3 and cfg.sweep.threshold == []
    assert cfg.tasks == ["arithmetic", "code_completion"]
    with pytest.raises(EvalConfigError, match="unknown nemodiff-eval key 'sweep.tau'"):
        to_eval_config({"model": "m", "out": "o", "sweep": {"tau": [0.5]}})
    with pytest.raises(EvalConfigError, match="unknown nemodiff-eval key 'modle'"):
        to_eval_config({"model": "m", "out": "o", "modle": "x"})
    with pytest.raises(EvalConfigError, match="needs out="):
        to_eval_config({"model": "m"})
    with pytest.raises(EvalConfigError, match="'batch_size'"):
        to_eval_config({"model": "m", "out": "o", "batch_size": "many"})


def test_limit_is_per_task_when_a_mapping():
    tasks = ["arithmetic", "code_completion"]
    cfg = to_eval_config({"model": "m", "out": "o", "task": tasks, "limit": {"code_completion": 4}})
    assert cfg.limit_of("code_completion") == 4 and cfg.limit_of("arithmetic") is None
    assert EvalConfig(model="m", out="o", task=tasks, limit=9).limit_of("arithmetic") == 9
    with pytest.raises(ValueError, match=r"limit names \['gsm8k'\]"):
        EvalConfig(model="m", out="o", task=tasks, limit={"gsm8k": 3})
    for bad in (0, {"arithmetic": 0}, {"arithmetic": "all"}, True):
        with pytest.raises(ValueError, match="limit must be"):
            EvalConfig(model="m", out="o", task=tasks, limit=bad)


def test_ar_runs_first_and_is_added_for_spec_modes():
    assert with_reference(["quadratic_spec", "diffusion"]) == (["ar", "diffusion", "quadratic_spec"], True)
    assert with_reference(["linear_spec", "ar"]) == (["ar", "linear_spec"], False)
    assert with_reference(["diffusion"]) == (["diffusion"], False)


def test_resolve_model_dir(tmp_path):
    hf = tmp_path / "hfdir"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model_dir(hf) == hf
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("a: 1\n")
    with pytest.raises(FileNotFoundError, match="export it first: nemodiff-export"):
        resolve_model_dir(run)
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    assert resolve_model_dir(run) == run / "hf"
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face model directory"):
        resolve_model_dir(tmp_path / "nothing")


def test_eos_ids_collect_tokenizer_generation_config_and_im_end():
    tok = make_tiny_tokenizer()

    class GenCfg:
        eos_token_id = [tok.eos_token_id, 7]

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok, GenCfg()) == (tok.eos_token_id, 7, im_end)
    assert stop_token_ids(tok, None) == (tok.eos_token_id, im_end)


def test_report_files_and_table(tmp_path):
    rows = [_row("ar", 1.0, 100.0, 0.5),
            _row("diffusion", 2.0, 150.0, 0.25),
            _row("linear_spec", 1.5, 120.0, 0.5, lossless=1.0),
            _row("diffusion", 3.0, 1.0, 0.1, sweep="threshold", threshold=0.5),
            _row("linear_spec", 1.2, 90.0, 0.5, sweep="block_size", block_size=2, lossless=1.0)]
    samples = [{"mode": "ar", "index": 0, "prompt_ids": [1, 2], "output_ids": [3], "forwards": 1, "output_text": "x"}]
    write_outputs(tmp_path, rows, samples, config={"model": "m"})
    assert json.loads((tmp_path / "eval.json").read_text()) == rows
    assert [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == samples
    pytest.importorskip("matplotlib")
    assert (tmp_path / "tpf_accuracy.png").read_bytes()[:4] == b"\x89PNG"

    table = format_table(rows)
    header = table.splitlines()[0]
    for col in ("task", "mode", "TPF", "tok/s", "vs ar", "accuracy", "lossless"):
        assert col in header
    assert "1.50x" in table and "prefill forwards excluded" in table
    assert "0.500 (token_accuracy)" in table
    spec_line = next(line for line in table.splitlines() if "| linear_spec " in line)
    assert spec_line.rstrip().endswith("1.000") and "1.20x" in spec_line
    main, sweep = table.split("sweep points")
    assert "tau=0.5" in sweep and "B=2" in sweep and "tau=0.5" not in main
    assert "0.90x" in sweep  # sweep rows are compared with the same task's AR row

"""The real ``nemodiff-eval`` CLI and the lm-eval entry point, as subprocesses on a tiny random model."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tiny_run import make_model_dir

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LM_EVAL_TASKS = ROOT / "tests" / "data" / "lm_eval_task"
MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec"]
PROMPT = 'def add(a, b):\n    """Return a + b."""\n'


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_assets")
    make_model_dir(root / "model")
    rows = [{"prompt": PROMPT, "reference": "    return a + b\n", "source": "m.py", "name": "add"},
            {"prompt": "def one():\n    \"\"\"One.\"\"\"\n", "reference": "    return 1\n", "source": "m.py", "name": "one"},
            {"prompt": "def hello():\n    \"\"\"Hi.\"\"\"\n", "reference": "    print('hi')\n", "source": "m.py",
             "name": "hello"}]
    (root / "cc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _run(module: str, args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", module, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def test_eval_cli_all_modes(assets, tmp_path):
    out_dir = tmp_path / "out"
    res = _run("nemodiff_train.cli.evaluate",
               [f"model={assets / 'model'}", f"modes=[{','.join(MODES)}]", f"task={assets / 'cc.jsonl'}",
                f"out={out_dir}", "max_new_tokens=8", "block_size=4", "sweep.threshold=[0.5,0.9]",
                "sweep.block_size=[2,4]"], cwd=tmp_path)
    # Hydra must not change directory or leave outputs/.hydra behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    all_rows = json.loads((out_dir / "eval.json").read_text())
    rows = [r for r in all_rows if r["sweep"] is None]
    assert [r["mode"] for r in rows] == MODES
    # sweep points: diffusion at the other tau, each self-speculation mode at the other block size
    sweep = [(r["mode"], r["sweep"], r["threshold"], r["block_size"]) for r in all_rows if r["sweep"]]
    assert sweep == [("diffusion", "threshold", 0.5, 4), ("linear_spec", "block_size", 0.9, 2),
                     ("quadratic_spec", "block_size", 0.9, 2)]
    assert all(r["lossless"] == 1.0 for r in all_rows if r["mode"].endswith("_spec"))
    for r in all_rows:
        for key in ("task", "samples", "generated_tokens", "forwards", "prefill_forwards", "tpf", "tokens_per_s",
                    "exact_match", "token_accuracy", "block_size", "threshold", "temperature", "dtype", "device",
                    "torch_version", "transformers_version", "model", "seed"):
            assert key in r, (r["mode"], key)
        assert r["samples"] == 3 and r["prefill_forwards"] == 3
        assert r["tpf"] == pytest.approx(r["generated_tokens"] / r["forwards"])
    by_mode = {r["mode"]: r for r in rows}
    # fp32 on CPU: self-speculation is exactly AR greedy (docs/decoding.md, "Lossless at temperature 0"), even for a random model.
    assert by_mode["linear_spec"]["lossless"] == 1.0 and by_mode["quadratic_spec"]["lossless"] == 1.0
    assert "lossless" not in by_mode["ar"] and "lossless" not in by_mode["diffusion"]
    assert all(r["block_size"] == 4 for r in rows)

    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 3
    for s in samples:
        assert {"mode", "index", "prompt_ids", "output_ids", "forwards", "output_text"} <= set(s)
        assert 1 <= len(s["output_ids"]) <= 8
    ar = {s["index"]: s["output_ids"] for s in samples if s["mode"] == "ar"}
    assert all(s["output_ids"] == ar[s["index"]] for s in samples if s["mode"].endswith("_spec"))
    assert (out_dir / "tpf_accuracy.png").stat().st_size > 0
    assert "lossless" in res.stdout and "linear_spec" in res.stdout and "prefill forwards excluded" in res.stdout


def test_eval_cli_commit_rule_reaches_block_diffusion(assets, tmp_path):
    """``commit_rule=prefix`` decodes block diffusion with the left-to-right rule (the samples equal the
    decoder's own output under it) and is recorded in eval.json; an unknown rule is refused by name."""
    from nemodiff_train.decoding import DecodeConfig, generate
    from nemodiff_train.models.loading import load_for_decoding

    out = {}
    for rule in ("confident", "prefix"):
        _run("nemodiff_train.cli.evaluate",
             [f"model={assets / 'model'}", f"task={assets / 'cc.jsonl'}", "modes=[diffusion]", f"commit_rule={rule}",
              "max_new_tokens=8", "block_size=4", "sweep.threshold=[]", f"out={tmp_path / rule}"], cwd=tmp_path)
        rows = json.loads((tmp_path / rule / "eval.json").read_text())
        assert [(r["mode"], r["commit_rule"]) for r in rows] == [("diffusion", rule)]
        out[rule] = [json.loads(line) for line in (tmp_path / rule / "samples.jsonl").read_text().splitlines()]
    _, lm, eos, _ = load_for_decoding(str(assets / "model"), "float32", "cpu")
    for rule, samples in out.items():
        cfg = DecodeConfig(max_new_tokens=8, block_size=4, threshold=0.9, commit_rule=rule, eos_token_ids=eos)
        for s in samples:
            assert s["output_ids"] == generate(lm, [s["prompt_ids"]], "diffusion", cfg)[0].tokens, rule
    assert [s["output_ids"] for s in out["prefix"]] != [s["output_ids"] for s in out["confident"]]
    # sweep.commit_rule: the other rules as extra rows of one evaluation (the main rule's row not repeated)
    res = _run("nemodiff_train.cli.evaluate",
               [f"model={assets / 'model'}", f"task={assets / 'cc.jsonl'}", "modes=[diffusion]", "commit_rule=prefix_ar",
                "sweep.commit_rule=[confident,prefix,prefix_ar]", "sweep.threshold=[]", "max_new_tokens=8",
                "block_size=4", f"out={tmp_path / 'swept'}"], cwd=tmp_path)
    rows = json.loads((tmp_path / "swept" / "eval.json").read_text())
    assert [(r["commit_rule"], r["sweep"]) for r in rows] == [("prefix_ar", None), ("confident", "commit_rule"),
                                                               ("prefix", "commit_rule")]
    alone = json.loads((tmp_path / "confident" / "eval.json").read_text())[0]  # the same rule, run on its own
    assert (rows[1]["tpf"], rows[1]["token_accuracy"]) == (alone["tpf"], alone["token_accuracy"])
    assert "diffusion rule=confident" in res.stdout and (tmp_path / "swept" / "tpf_accuracy.png").is_file()
    bad = _run("nemodiff_train.cli.evaluate", [f"model={assets / 'model'}", "commit_rule=leftmost",
                                               f"out={tmp_path / 'bad'}"], cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "commit_rule must be one of" in bad.stderr


def test_eval_cli_run_dir_bundled_task_and_spec_only(assets, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {}\n")
    failed = _run("nemodiff_train.cli.evaluate", [f"model={run}", f"out={tmp_path / 'o'}"], cwd=tmp_path, check=False)
    assert failed.returncode != 0 and "export it first" in failed.stderr

    (run / "hf").symlink_to(assets / "model", target_is_directory=True)
    res = _run("nemodiff_train.cli.evaluate",
               [f"model={run}", "modes=[linear_spec]", "limit=1", f"out={tmp_path / 'o'}", "max_new_tokens=4",
                "block_size=4", "sweep.threshold=[]"], cwd=tmp_path)
    rows = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert [(r["mode"], r["requested"]) for r in rows] == [("ar", False), ("linear_spec", True)]
    assert rows[0]["task"] == "code_completion" and "first_line_exact" in rows[0]
    assert "reference for the self-speculation" in res.stderr


def test_eval_cli_sweeps_only_the_named_tasks(assets, tmp_path):
    """``sweep.tasks`` keeps the curve's extra runs to the tasks named; the others get main runs only."""
    swept = tmp_path / "swept.jsonl"
    swept.write_text((assets / "cc.jsonl").read_text())
    _run("nemodiff_train.cli.evaluate",
         [f"model={assets / 'model'}", "modes=[ar,diffusion]", f"task=[{assets / 'cc.jsonl'},{swept}]",
          f"sweep.tasks=[{swept}]", "sweep.threshold=[0.5]", "limit=1", "max_new_tokens=4", "block_size=4",
          f"out={tmp_path / 'o'}"], cwd=tmp_path)
    rows = json.loads((tmp_path / "o" / "eval.json").read_text())
    runs = [(r["task"], r["mode"], r["sweep"]) for r in rows]
    assert runs == [("cc", "ar", None), ("cc", "diffusion", None), ("swept", "ar", None),
                    ("swept", "diffusion", None), ("swept", "diffusion", "threshold")]


def test_eval_cli_limits_each_task_named_in_a_limit_mapping(assets, tmp_path):
    """``limit={task: n}`` caps the tasks it names; a task it does not name runs every sample."""
    full = tmp_path / "full.jsonl"
    full.write_text("".join((assets / "cc.jsonl").read_text().splitlines(keepends=True)[:3]))
    res = _run("nemodiff_train.cli.evaluate",
               [f"model={assets / 'model'}", "modes=[ar]", f"task=[arithmetic,{full}]", "limit={arithmetic: 2}",
                "max_new_tokens=4", "block_size=4", "sweep.threshold=[]", f"out={tmp_path / 'o'}"], cwd=tmp_path)
    rows = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert [(r["task"], r["samples"]) for r in rows] == [("arithmetic", 2), ("full", 3)]
    assert "2 task(s), 2 samples of arithmetic, 3 samples of full," in res.stdout


@pytest.mark.parametrize("override", ["modle=/x", "+modle=/x"])
def test_eval_cli_misspelt_key_fails_naming_it(tmp_path, override):
    res = _run("nemodiff_train.cli.evaluate", [override, f"out={tmp_path / 'o'}"], cwd=tmp_path, check=False)
    assert res.returncode != 0
    assert "modle" in res.stderr
    assert not (tmp_path / "o").exists()


def test_lm_eval_entry_point(assets, tmp_path):
    pytest.importorskip("lm_eval")
    stats = tmp_path / "stats.json"
    res = _run("nemodiff_train.cli.lm_eval",
               ["--model", "nemodiff",
                "--model_args", f"pretrained={assets / 'model'},mode=linear_spec,block_size=4,stats_out={stats}",
                "--tasks", "nemodiff_tiny_gen,nemodiff_tiny_mc,nemodiff_tiny_text", "--include_path", str(LM_EVAL_TASKS),
                "--limit", "2", "--device", "cpu", "--output_path", str(tmp_path / "lm_out")], cwd=tmp_path)
    (results_file,) = glob.glob(str(tmp_path / "lm_out" / "**" / "results_*.json"), recursive=True)
    results = json.loads(Path(results_file).read_text())
    assert set(results["results"]) == {"nemodiff_tiny_gen", "nemodiff_tiny_mc", "nemodiff_tiny_text"}
    assert "exact_match,none" in results["results"]["nemodiff_tiny_gen"]
    assert "acc,none" in results["results"]["nemodiff_tiny_mc"]
    assert results["results"]["nemodiff_tiny_text"]["word_perplexity,none"] > 0
    decode = results["config"]["nemodiff"]["decode_stats"]
    assert decode["requests"] == 2 and decode["forwards"] > 0 and decode["loglikelihood_requests"] > 0
    assert json.loads(stats.read_text())["decode_stats"]["requests"] == 2
    assert "nemodiff linear_spec: 2 generate requests" in res.stderr


def test_eval_cli_base_row_is_the_untouched_base_and_every_accuracy_has_an_interval(assets, tmp_path):
    """``base_model=``: one more row, ``mode: base``, decoded from the other model (checked against plain
    transformers generate() of that model), and a 95 % interval beside every accuracy."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers.tiny_models import save_tiny_model
    from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

    base = tmp_path / "base"  # another network with an untied random head: its outputs differ from the model's
    tok = make_tiny_tokenizer(base)
    save_tiny_model(base, seed=1, vocab_size=len(tok), tie=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    out_dir = tmp_path / "out"
    res = _run("nemodiff_train.cli.evaluate",
               [f"model={assets / 'model'}", f"base_model={base}", "modes=[ar,linear_spec]",
                f"task={assets / 'cc.jsonl'}", f"out={out_dir}", "max_new_tokens=6", "block_size=4",
                "sweep.threshold=[]"], cwd=tmp_path)
    rows = json.loads((out_dir / "eval.json").read_text())
    assert [r["mode"] for r in rows] == ["ar", "linear_spec", "base"]
    assert rows[2]["model"] == str(base) and rows[1]["lossless"] == 1.0  # lossless still against the model's AR
    for r in rows:
        for metric in r["metric_names"]:
            low, high = r[f"{metric}_ci95"]
            assert 0.0 <= low <= r[metric] <= high <= 1.0
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    base_out = {s["index"]: s for s in samples if s["mode"] == "base"}
    ar_out = {s["index"]: s["output_ids"] for s in samples if s["mode"] == "ar"}
    assert len(base_out) == 3 and any(base_out[i]["output_ids"] != ar_out[i] for i in ar_out)
    hf = AutoModelForCausalLM.from_pretrained(base).eval()
    for s in base_out.values():  # the base row is the untouched base: plain transformers greedy decoding
        ids = torch.tensor([s["prompt_ids"]])
        ref = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=hf.config.eos_token_id,
                          pad_token_id=hf.config.eos_token_id)[0, ids.shape[1]:].tolist()
        assert s["output_ids"] == ref[:len(s["output_ids"])] and (len(ref) == len(s["output_ids"]))
    assert "base = the untouched base model" in res.stdout and "95 % interval" in res.stdout

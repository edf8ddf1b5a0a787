"""The model card: front matter, recipe/data/training facts, usage, and the measured evaluation table."""

import json

import pytest
import yaml

from nemodiff_train.export import ExportError, export_checkpoint, write_model_card
from nemodiff_train.export.model_card import eval_table, render_model_card
from tests.unit.test_export_support import one_thread  # noqa: F401  (autouse: one intra-op thread)
from tests.unit.test_export_support import make_dlm, make_run_dir

pytestmark = pytest.mark.unit

ROWS = [
    {"mode": "linear_spec", "task": "code_completion", "samples": 8, "generated_tokens": 512, "forwards": 200,
     "tpf": 2.56, "tokens_per_s": 301.4, "lossless": 1.0, "token_accuracy": 0.4213, "exact_match": 0.125,
     "metric_names": ["token_accuracy", "exact_match"], "block_size": 8, "threshold": 0.9, "dtype": "float32"},
    {"mode": "ar", "task": "code_completion", "samples": 8, "generated_tokens": 512, "forwards": 504,
     "tpf": 1.016, "tokens_per_s": 150.0, "token_accuracy": 0.4213, "exact_match": 0.125,
     "metric_names": ["token_accuracy", "exact_match"], "block_size": 8, "threshold": 0.9, "dtype": "float32"},
    {"mode": "diffusion", "task": "code_completion", "samples": 8, "generated_tokens": 512, "forwards": 170,
     "tpf": 3.01, "tokens_per_s": 280.0, "token_accuracy": 0.39, "exact_match": 0.0,
     "metric_names": ["token_accuracy", "exact_match"], "block_size": 8, "threshold": 0.9, "dtype": "float32"},
]

META = {"mask_token_id": 320, "train_block_size": 16, "inference_block_size": 8, "attention_pattern": "two_stream",
        "alpha": 0.3, "beta": 1.0, "recipe": "tiny_cpu", "base_model": "acme/tiny-base", "training_steps": 6,
        "training_tokens": 768, "nemodiff_version": "0.1.0", "export_dtype": "float32",
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 6, "sources": ["embedded:pretrain_train.jsonl.gz"],
                    "seq_len": 32, "global_batch_size": 4}]}


def front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_front_matter_and_sections():
    text = render_model_card(META, ROWS, remote_code=True, repo="acme/tiny-dlm")
    fm = front_matter(text)
    assert fm["library_name"] == "transformers" and fm["base_model"] == "acme/tiny-base"
    assert {"diffusion", "dllm", "text-generation"} <= set(fm["tags"])
    assert "license" not in fm and "datasets" not in fm  # unknown license; embedded data has no Hub page
    for needle in ("tiny_cpu", "embedded:pretrain_train.jsonl.gz", "Training steps: 6", "768",
                   "AutoModelForCausalLM.from_pretrained(\"acme/tiny-dlm\", revision=revision)",
                   'snapshot_download("acme/tiny-dlm", revision="main")', "trust_remote_code=True",
                   "mode=\"diffusion\"", "from nemodiff_train.decoding import", "prefill forward excluded"):
        assert needle in text, needle
    # a local or embedded base is not a Hub id: no base_model key (the Hub would reject it)
    assert "base_model" not in front_matter(render_model_card({**META, "base_model": "embedded"}))
    assert "base_model" not in front_matter(render_model_card({**META, "base_model": "/data/models/x"}))
    no_remote = render_model_card(META)
    assert "trust_remote_code" not in no_remote and "remote_code=true" in no_remote
    assert "Not measured" in no_remote


def test_eval_table_modes_tpf_speed_accuracy_lossless():
    lines = eval_table(ROWS).splitlines()
    assert lines[0] == "| mode | task | samples | TPF | tokens/s | token_accuracy | exact_match | lossless |"
    # AR first, then diffusion, then self-speculation (the canonical mode order)
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["`ar`", "`diffusion`", "`linear_spec`"]
    assert lines[4] == "| `linear_spec` | code_completion | 8 | 2.56 | 301.4 | 0.421 | 0.125 | 100% |"
    assert lines[2].endswith("| – |")  # AR has no lossless figure
    # rows without metric_names: any extra numeric key is a metric
    assert "pass_at_1" in eval_table([{"mode": "ar", "task": "t", "tpf": 1.0, "pass_at_1": 0.5}])


def test_export_picks_up_the_runs_eval_json_and_card_can_be_refreshed(tmp_path):
    dlm = make_dlm(tmp_path, "qwen3")
    run_dir = make_run_dir(tmp_path / "run", dlm)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "eval.json").write_text(json.dumps(ROWS))
    out = export_checkpoint(run_dir, tmp_path / "out")
    text = (out / "README.md").read_text()
    assert "| `linear_spec` | code_completion | 8 | 2.56 | 301.4 |" in text
    assert front_matter(text)["base_model"] == "acme/tiny-base"
    assert "Qwen3ForCausalLM" in text
    # the trainer refreshes the card after evaluating the export
    newer = [{**ROWS[1], "tpf": 1.5}]
    (tmp_path / "new.json").write_text(json.dumps(newer))
    write_model_card(out, eval_json=tmp_path / "new.json")
    text = (out / "README.md").read_text()
    assert "| `ar` | code_completion | 8 | 1.50 |" in text and "linear_spec` | code_completion" not in text
    assert "tiny" in text and "export_test" in text  # provenance still read back from config.json


def test_bad_eval_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"nemodiff": META}))
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps({"mode": "ar"}))
    with pytest.raises(ExportError, match=r"eval\.json is not a list"):
        write_model_card(tmp_path, eval_json=bad)
    with pytest.raises(ExportError, match="does not exist"):
        write_model_card(tmp_path, eval_json=tmp_path / "missing.json")
    assert not (tmp_path / "README.md").exists()


def test_card_loads_with_huggingface_hub_and_its_model_index_round_trips(tmp_path):
    """ModelCard.load parses the card; the model-index holds every task x mode with its metric values."""
    from huggingface_hub import ModelCard

    rows = ROWS + [{**ROWS[0], "mode": "quadratic_spec", "tpf": 3.9, "lossless": 0.875},
                   {**ROWS[1], "task": "arithmetic", "token_accuracy": 0.9, "exact_match": 0.5},
                   {**ROWS[1], "block_size": 4, "tpf": 9.9, "sweep": True}]  # a sweep point stays out
    (tmp_path / "README.md").write_text(render_model_card(META, rows, repo="acme/tiny-dlm"))
    card = ModelCard.load(tmp_path / "README.md")
    results = card.data.eval_results
    by_key = {}
    for r in results:
        assert r.task_type == "text-generation" and r.metric_config == r.dataset_config
        by_key.setdefault((r.dataset_name, r.dataset_config), {})[r.metric_type] = r.metric_value
    assert set(by_key) == {("code_completion", m) for m in ("ar", "diffusion", "linear_spec", "quadratic_spec")} \
        | {("arithmetic", "ar")}
    for row in rows[:-1]:
        metrics = by_key[(row["task"], row["mode"])]
        expected = {"token_accuracy": row["token_accuracy"], "exact_match": row["exact_match"], "tpf": row["tpf"],
                    "tokens_per_s": row["tokens_per_s"]}
        if row["mode"] in ("linear_spec", "quadratic_spec"):
            expected["lossless"] = row["lossless"]
        assert metrics == pytest.approx(expected), (row["task"], row["mode"])
    assert "lossless" not in by_key[("code_completion", "diffusion")]
    # the Hub groups results per task x data set config: one model-index result per task x mode
    index = yaml.safe_load(card.content.split("---\n")[1])["model-index"][0]["results"]
    assert len(index) == 5 and card.data.base_model == "acme/tiny-base"
    # the human-readable table is still there
    assert "| `quadratic_spec` | code_completion | 8 | 3.90 |" in card.text


def test_card_names_hub_datasets_and_the_bases_license(tmp_path):
    """Hub data sets from the stages' sources; the license from a local base model's own card."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    stages = [{"name": "pretrain", "kind": "pretrain", "steps": 2,
               "sources": ["path=acme/web-text,config=en,split=train,weight=2", "embedded:pretrain_train.jsonl.gz",
                           str(tmp_path / "local.jsonl")]},
              {"name": "sft", "kind": "sft", "steps": 2, "sources": ["acme/chat-sft", "path=acme/web-text", "data/sft.jsonl"]}]
    fm = front_matter(render_model_card({**META, "base_model": str(base), "stages": stages}))
    assert fm["license"] == "apache-2.0" and "base_model" not in fm  # a local base: no Hub link
    assert fm["datasets"] == ["acme/web-text", "acme/chat-sft"]
    assert str(tmp_path) not in yaml.safe_dump(fm)  # no local path in the Hub metadata
    assert front_matter(render_model_card({**META, "license": "mit"}))["license"] == "mit"


def test_base_row_is_in_the_table_with_intervals_but_not_in_the_model_index():
    from huggingface_hub import ModelCard

    rows = [dict(r) for r in ROWS if not r.get("sweep")]
    ar = next(r for r in rows if r["mode"] == "ar")
    metric = ar["metric_names"][0] if ar.get("metric_names") else next(k for k in ar if k.endswith("accuracy"))
    ar[f"{metric}_ci95"] = [0.11, 0.99]
    base = dict(ar, mode="base", model="/abs/path/of/the/base")
    base.pop(f"{metric}_ci95")
    text = render_model_card(META, rows + [base], remote_code=False, repo="acme/tiny-dlm")
    assert "[0.11, 0.99]" in text and "`base`" in text and "untouched base model" in text
    assert "/abs/path/of/the/base" not in text
    configs = {r.dataset_config for r in ModelCard(text).data.eval_results}
    assert "base" not in configs and "ar" in configs

"""export_dlm: the export loads with plain transformers and computes the training model's causal logits."""

import json

import pytest
import torch

from nemodiff_train.export import ExportError, export_dlm, training_metadata
from nemodiff_train.models.hf import load_dlm
from tests.helpers.tiny_models import FAMILIES
from tests.unit.test_export_support import one_thread  # noqa: F401  (autouse: one intra-op thread)
from tests.unit.test_export_support import RESERVED_MASK, VOCAB, make_dlm, run_config

pytestmark = pytest.mark.unit


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _ids(seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mask", ["add", RESERVED_MASK])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_transformers_load_gives_training_logits(tmp_path, family, tie, mask):
    from transformers import AutoModelForCausalLM

    dlm = make_dlm(tmp_path, family, tie=tie, mask=mask)
    out = export_dlm(dlm, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == type(dlm.hf).__name__  # the base architecture, no remote code
    ids = _ids(vocab=VOCAB + (mask == "add"))
    assert (_logits(model, ids) - _logits(dlm.hf, ids)).abs().max().item() <= 1e-5
    # the head was untied in training and stays its own tensor
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    cfg = json.loads((out / "config.json").read_text())
    rec = cfg["nemodiff"]
    expected_mask = VOCAB if mask == "add" else RESERVED_MASK
    assert rec["mask_token_id"] == expected_mask
    assert (rec["train_block_size"], rec["inference_block_size"], rec["attention_pattern"]) == (16, 8, "two_stream")
    assert rec["nemodiff_version"] and rec["export_dtype"] == "float32" and cfg["dtype"] == "float32"
    assert "auto_map" not in cfg
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "model.safetensors"):
        assert (out / f).is_file(), f
    # our loader needs nothing else: same settings, the mask token known to the tokenizer
    again = load_dlm(out)
    assert again.settings == dlm.settings
    if mask == "add":
        assert again.tokenizer.convert_tokens_to_ids("<|mask|>") == VOCAB
    assert (_logits(again.hf, ids) - _logits(dlm.hf, ids)).abs().max().item() <= 1e-5


def test_sharded_export_writes_an_index_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    dlm = make_dlm(tmp_path, "llama", tie=False)
    out = export_dlm(dlm, tmp_path / "out", max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    ids = _ids()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (_logits(model, ids) - _logits(dlm.hf, ids)).abs().max().item() <= 1e-5


def test_bf16_export_loads_close_and_leaves_the_training_model_alone(tmp_path):
    from transformers import AutoModelForCausalLM

    dlm = make_dlm(tmp_path, "qwen3")
    before = {k: v.clone() for k, v in dlm.hf.state_dict().items()}
    out = export_dlm(dlm, tmp_path / "out", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = _ids()
    ref = _logits(dlm.hf, ids)
    err = (_logits(model.float(), ids) - ref).abs().max().item()
    assert err <= 0.02 * ref.abs().max().item() + 1e-3, err
    assert all(torch.equal(v, before[k]) for k, v in dlm.hf.state_dict().items())
    assert {p.dtype for p in dlm.hf.parameters()} == {torch.float32}
    assert str(getattr(dlm.hf.config, "dtype", "float32")).endswith("float32")


def test_refuses_a_non_empty_out_unless_overwrite(tmp_path):
    dlm = make_dlm(tmp_path, "qwen3")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty.*overwrite"):
        export_dlm(dlm, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError, match="not an earlier nemodiff export"):
        export_dlm(dlm, out, overwrite=True)  # overwrite replaces only an earlier export
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    export_dlm(dlm, out)
    (out / "stale.txt").write_text("old")
    export_dlm(dlm, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == ["out"]  # no tmp/old left
    (tmp_path / "empty").mkdir()
    export_dlm(dlm, tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / "config.json").is_file()


def test_a_failure_mid_export_leaves_nothing(tmp_path, monkeypatch):
    import nemodiff_train.export.model_card as card

    dlm = make_dlm(tmp_path, "qwen3")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(card, "write_model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_dlm(dlm, tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]
    with pytest.raises(RuntimeError, match="disk full"):  # missing parents are not left behind either
        export_dlm(dlm, tmp_path / "new" / "deeper" / "out")
    assert not (tmp_path / "new").exists()


def test_bad_dtype_and_bad_eval_json_fail_before_writing(tmp_path):
    dlm = make_dlm(tmp_path, "qwen3")
    with pytest.raises(ExportError, match="float16"):
        export_dlm(dlm, tmp_path / "out", dtype="float16")
    with pytest.raises(ExportError, match="max_shard_size 'lots'"):
        export_dlm(dlm, tmp_path / "out", max_shard_size="lots")
    bad = tmp_path / "eval.json"
    bad.write_text("{not json")
    with pytest.raises(ExportError, match="eval.json"):
        export_dlm(dlm, tmp_path / "out", eval_json=bad)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_training_metadata_is_recorded(tmp_path):
    dlm = make_dlm(tmp_path, "qwen3")
    meta = training_metadata(run_config(recipe="tiny_test"), step=6, tokens=768)
    out = export_dlm(dlm, tmp_path / "out", metadata=meta)
    rec = json.loads((out / "config.json").read_text())["nemodiff"]
    assert rec["recipe"] == "tiny_test" and (rec["alpha"], rec["beta"]) == (0.3, 1.0)
    assert rec["data_sources"] == ["embedded:pretrain_train.jsonl.gz"]
    assert (rec["training_steps"], rec["training_tokens"]) == (6, 768)
    # the DLM settings are the model's, whatever the metadata says
    assert rec["mask_token_id"] == dlm.settings.mask_token_id
    readme = (out / "README.md").read_text()
    assert "tiny_test" in readme and "768" in readme

"""export_checkpoint: run dir / checkpoint dir / HF dir sources, and clear failures that write nothing."""

import json
import shutil

import pytest
import torch

from nemodiff_train.export import ExportError, export_checkpoint
from tests.unit.test_export_support import one_thread  # noqa: F401  (autouse: one intra-op thread)
from tests.unit.test_export_support import make_dlm, make_run_dir, save_dcp, tree

pytestmark = pytest.mark.unit


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _assert_same_model(out, dlm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    assert (_logits(model, ids) - _logits(dlm.hf, ids)).abs().max().item() <= 1e-5


@pytest.fixture
def run(tmp_path):
    dlm = make_dlm(tmp_path, "qwen3", tie=True)
    return make_run_dir(tmp_path / "run", dlm), dlm


def _fails(source, out, match):
    """The export fails with a message matching ``match`` and leaves the filesystem as it was."""
    parent = out.parent
    before = tree(parent)
    with pytest.raises(ExportError, match=match) as info:
        export_checkpoint(source, out)
    assert tree(parent) == before
    return str(info.value)


def test_run_dir_exports_its_latest_complete_checkpoint(run, tmp_path):
    run_dir, dlm = run
    # an older complete checkpoint and a newer incomplete one must both be passed over
    old = {k: torch.zeros_like(v) for k, v in dlm.hf.state_dict().items()}
    save_dcp(run_dir / "checkpoints" / "step_00000002", old, 2)
    save_dcp(run_dir / "checkpoints" / "step_00000009", old, 9, complete=False)
    out = export_checkpoint(run_dir, tmp_path / "out")
    _assert_same_model(out, dlm)
    rec = json.loads((out / "config.json").read_text())["nemodiff"]
    assert rec["checkpoint"] == "step_00000006"
    assert (rec["training_steps"], rec["training_tokens"]) == (6, 6 * 4 * 32)
    assert rec["recipe"] == "export_test" and rec["data_sources"] == ["embedded:pretrain_train.jsonl.gz"]
    assert (rec["alpha"], rec["beta"], rec["mask_token_id"]) == (0.3, 1.0, dlm.settings.mask_token_id)
    assert (rec["train_block_size"], rec["inference_block_size"]) == (16, 8)
    assert rec["base_model"] == "acme/tiny-base"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert "base_model: acme/tiny-base" in (out / "README.md").read_text()


def test_checkpoint_dir_and_hf_dir_sources(run, tmp_path):
    from nemodiff_train.models.hf import load_dlm

    run_dir, dlm = run
    out = export_checkpoint(run_dir / "checkpoints" / "step_00000006", tmp_path / "a", dtype="float32")
    _assert_same_model(out, dlm)
    # an HF directory (here: the export itself) re-exports as it is, e.g. to add remote code
    again = export_checkpoint(out, tmp_path / "b", remote_code=True)
    _assert_same_model(again, dlm)
    assert load_dlm(again).settings == dlm.settings
    assert json.loads((again / "config.json").read_text())["nemodiff"]["recipe"] == "export_test"


def test_untied_base_and_reserved_mask_from_a_run(tmp_path):
    dlm = make_dlm(tmp_path, "mistral", tie=False, mask=5)
    run_dir = make_run_dir(tmp_path / "run", dlm, with_config=False)  # no config.yaml: hf_base is enough
    out = export_checkpoint(run_dir, tmp_path / "out")
    _assert_same_model(out, dlm)
    assert json.loads((out / "config.json").read_text())["nemodiff"]["mask_token_id"] == 5


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # single-process save
def test_a_checkpoint_saved_by_the_trainer_exports(tmp_path):
    ckpt_mod = pytest.importorskip("nemodiff_train.engines.torch.checkpointing")
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dlm = make_dlm(tmp_path, "llama", tie=True)
    run_dir = make_run_dir(tmp_path / "run", dlm)
    shutil.rmtree(run_dir / "checkpoints")
    ckpt_mod.save_checkpoint(run_dir, 12, {"model": get_model_state_dict(dlm.hf)}, {"step": 12, "tokens": 99},
                             keep_last=2)
    out = export_checkpoint(run_dir, tmp_path / "out")
    _assert_same_model(out, dlm)
    rec = json.loads((out / "config.json").read_text())["nemodiff"]
    assert (rec["training_steps"], rec["training_tokens"]) == (12, 99)


def test_refuses_to_export_over_its_own_source(run):
    run_dir, _ = run
    with pytest.raises(ExportError, match="would replace the checkpoint"):
        export_checkpoint(run_dir, run_dir, overwrite=True)
    assert (run_dir / "checkpoints" / "step_00000006" / "COMPLETE").is_file()


# ------------------------------------------------------------------------------------------------
# corrupt / incomplete checkpoints: a clear message naming the file or key, and nothing written


def test_missing_complete_marker(run, tmp_path):
    run_dir, _ = run
    ckpt = run_dir / "checkpoints" / "step_00000006"
    (ckpt / "COMPLETE").unlink()
    _fails(ckpt, tmp_path / "out", r"incomplete checkpoint .*step_00000006.*COMPLETE")
    _fails(run_dir, tmp_path / "out", r"no complete checkpoint.*step_00000006")


def test_missing_or_garbled_dcp_metadata(run, tmp_path):
    run_dir, _ = run
    meta = run_dir / "checkpoints" / "step_00000006" / ".metadata"
    meta.write_bytes(b"garbage" * 10)
    _fails(run_dir, tmp_path / "out", r"\.metadata is unreadable")
    meta.unlink()
    _fails(run_dir, tmp_path / "out", r"\.metadata is missing")


def test_missing_truncated_or_garbled_data_file(run, tmp_path):
    run_dir, _ = run
    data = run_dir / "checkpoints" / "step_00000006" / "__0_0.distcp"
    original = data.read_bytes()
    data.write_bytes(original[: len(original) // 2])
    _fails(run_dir, tmp_path / "out", r"__0_0\.distcp is truncated")
    # same length, random bytes in the middle: unreadable tensor records
    garbled = bytearray(original)
    garbled[100:len(garbled) - 100] = torch.randint(0, 256, (len(garbled) - 200,), dtype=torch.uint8).numpy().tobytes()
    data.write_bytes(bytes(garbled))
    msg = _fails(run_dir, tmp_path / "out", r"__0_0\.distcp")
    assert "garbled" in msg or "cannot load" in msg or "NaN" in msg
    data.unlink()
    _fails(run_dir, tmp_path / "out", r"__0_0\.distcp is missing")


def test_shapes_that_do_not_fit_hf_base(run, tmp_path):
    run_dir, _ = run
    cfg_file = run_dir / "hf_base" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["intermediate_size"] = 48
    cfg_file.write_text(json.dumps(cfg))
    _fails(run_dir, tmp_path / "out", r"weight 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape .* needs")


def test_missing_weight_key(tmp_path):
    dlm = make_dlm(tmp_path, "qwen3", tie=False)
    run_dir = make_run_dir(tmp_path / "run", dlm)
    ckpt = run_dir / "checkpoints" / "step_00000006"
    shutil.rmtree(ckpt)
    sd = {k: v for k, v in dlm.hf.state_dict().items() if k != "lm_head.weight"}
    save_dcp(ckpt, sd, 6)
    _fails(run_dir, tmp_path / "out", r"weight 'lm_head\.weight' is missing")


def test_missing_mask_token(tmp_path):
    dlm = make_dlm(tmp_path, "qwen3", mask=5)  # reserved id: the tokenizer has no <|mask|>
    run_dir = make_run_dir(tmp_path / "run", dlm, with_config=False)
    cfg_file = run_dir / "hf_base" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["nemodiff"]["mask_token_id"]
    cfg_file.write_text(json.dumps(cfg))
    _fails(run_dir, tmp_path / "out", r"no mask token: .*hf_base/config\.json.*nemodiff\.mask_token_id")
    cfg["nemodiff"]["mask_token_id"] = 4000
    cfg_file.write_text(json.dumps(cfg))
    _fails(run_dir, tmp_path / "out", r"mask token id 4000 .* outside")


def test_missing_hf_base_and_unknown_paths(run, tmp_path):
    run_dir, _ = run
    _fails(tmp_path / "nowhere", tmp_path / "out", "does not exist")
    (tmp_path / "junk").mkdir()
    _fails(tmp_path / "junk", tmp_path / "out", "neither a Hugging Face model directory")
    shutil.rmtree(run_dir / "hf_base")
    _fails(run_dir, tmp_path / "out", r"hf_base/config\.json is missing")


def test_a_head_left_tied_in_training_exports_tied(tmp_path):
    from nemodiff_train.models.hf import load_dlm
    from tests.unit.test_export_support import make_base

    dlm = load_dlm(make_base(tmp_path / "base", "qwen2", tie=True), mask_token=5, untie_head=False)
    assert dlm.hf.get_output_embeddings().weight is dlm.hf.get_input_embeddings().weight
    with torch.no_grad():
        dlm.hf.get_input_embeddings().weight.mul_(1.5)
    run_dir = make_run_dir(tmp_path / "run", dlm)
    out = export_checkpoint(run_dir, tmp_path / "out")
    _assert_same_model(out, dlm)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True

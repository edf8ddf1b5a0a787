"""Drafter-adapter export (export/adapter.py): PEFT-format files beside a base reference, reloaded by the
package and by the generated remote code with the same outputs; merge=true; a Hub push of the adapter alone."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemodiff_train.decoding import MODES, DecodeConfig, generate
from nemodiff_train.export import export_adapter, export_merged, push_to_hub
from nemodiff_train.models.adapter_export import is_adapter_export, load_adapter_export
from nemodiff_train.export.remote_code import MODELING_FILE
from nemodiff_train.models.adapter import adapter_tokens
from nemodiff_train.models.cached import HFCachedLM
from tests.unit.test_adapter import randomize
from tests.unit.test_export_hub import hub  # noqa: F401 (fixture: the mock Hub)
from tests.unit.test_export_remote_code import left_pad, load_remote_class
from tests.unit.test_export_support import make_base, one_thread  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.unit

MASK = 5  # a reserved id of the base vocabulary (an adapter never grows the base)
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23]]


@pytest.fixture(scope="module")
def drafter(tmp_path_factory):
    from nemodiff_train.models.hf import load_dlm

    base = make_base(tmp_path_factory.mktemp("adapter_base") / "base", "qwen3", tie=False)
    dlm = load_dlm(base, mask_token=MASK, untie_head=False, settings={"inference_block_size": 4})
    dlm.add_adapter(rank=4, alpha=8.0)
    randomize(dlm.adapter, scale=0.3)
    return base, dlm.eval()


def decode_all(lm, prompts=PROMPTS, block=4):
    cfg = DecodeConfig(max_new_tokens=10, block_size=block, threshold=0.9)
    return {mode: [r.tokens for r in generate(lm, prompts, mode, cfg)] for mode in MODES}


def test_adapter_export_files_and_reload(drafter, tmp_path):
    base, dlm = drafter
    out = export_adapter(dlm, tmp_path / "adapter", base_path=str(base), base_hub_id="acme/tiny-base",
                         remote_code=True)
    assert is_adapter_export(out)
    assert not list(out.glob("model*.safetensors"))  # no base weights
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    assert cfg["base_model_name_or_path"] == "acme/tiny-base"
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    rec = cfg["nemodiff"]
    assert rec["mask_token_id"] == MASK and (out / rec["adapter"]["base_path"]).resolve() == base.resolve()
    assert not Path(rec["adapter"]["base_path"]).is_absolute()  # relative to the export: no machine path
    for f in (p for p in out.rglob("*") if p.is_file()):  # no absolute path of this machine in any file
        data = f.read_bytes()
        assert str(base).encode() not in data and str(tmp_path).encode() not in data, f
    assert json.loads((out / "config.json").read_text())["nemodiff"]["adapter"]["r"] == 4
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights
    assert len(weights) == 2 * 2 * 4 + 1  # 2 layers x 4 targets x (A, B) + the mask row
    back = load_adapter_export(out)
    assert back.adapter is not None
    for key, value in dlm.hf.state_dict().items():
        assert torch.equal(back.hf.state_dict()[key], value), key
    assert decode_all(HFCachedLM(back)) == decode_all(HFCachedLM(dlm))


def test_bench_loads_an_adapter_export_with_the_evaluators_loader(drafter, tmp_path):
    """nemodiff-bench decodes an adapter export (base + adapter, gate passed through its forward counter)."""
    from nemodiff_train.bench.runner import BenchConfig, run_bench

    base, dlm = drafter
    out = export_adapter(dlm, tmp_path / "adapter", base_path=str(base), remote_code=False)
    report = run_bench(BenchConfig(model=str(out), out=str(tmp_path / "bench"), prompt_len=5, max_new_tokens=6,
                                   block_size=4, warmups=0, runs=1, batch_sizes=[1], sol_repeats=1, cache="dynamic"))
    rows = {r["mode"]: r for r in report["results"]}
    assert report["model"] == str(out) and set(rows) == {*MODES, "hf_generate"}
    assert rows["linear_spec"]["same_as_ar"] == rows["quadratic_spec"]["same_as_ar"] == 1.0  # lossless at T = 0


def test_remote_code_loads_base_plus_adapter(drafter, tmp_path):
    """modeling_nemodiff.py's from_pretrained on an adapter directory: base from the recorded path, the
    adapter attached; every mode equals ours, and plain generate() is the untouched base."""
    from transformers import AutoModelForCausalLM

    base, dlm = drafter
    out = export_adapter(dlm, tmp_path / "adapter_rc", base_path=str(base), remote_code=True)
    cls_name = json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].split(".")[1]
    remote = load_remote_class(out, cls_name).from_pretrained(out).eval()
    ours = decode_all(HFCachedLM(dlm))
    ids, attn = left_pad(PROMPTS)
    for mode in MODES:
        got = remote.generate(ids, attention_mask=attn, mode=mode, max_new_tokens=10, block_size=4, threshold=0.9,
                              eos_token_id=[], return_dict_in_generate=True)
        assert got.tokens == ours[mode], mode
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    prompt = torch.tensor([PROMPTS[0]])
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(remote.generate(prompt, **kw), plain.generate(prompt, **kw))
    # a base that is not where the export says: a clear error, and base_model= overrides the record
    moved = tmp_path / "moved"
    base.rename(moved)
    try:
        with pytest.raises(OSError, match="base model could not be loaded"):
            load_remote_class(out, cls_name).from_pretrained(out)
        again = load_remote_class(out, cls_name).from_pretrained(out, base_model=str(moved)).eval()
        got = again.generate(ids, attention_mask=attn, mode="linear_spec", max_new_tokens=10, block_size=4,
                             eos_token_id=[], return_dict_in_generate=True)
        assert got.tokens == ours["linear_spec"]
    finally:
        moved.rename(base)


def test_merged_export_is_the_adapter_on_every_token(drafter, tmp_path):
    from transformers import AutoModelForCausalLM

    base, dlm = drafter
    before = {k: v.clone() for k, v in dlm.hf.state_dict().items()}
    out = export_merged(dlm, tmp_path / "merged")
    for key, value in before.items():  # the live model is left as it is
        assert torch.equal(dlm.hf.state_dict()[key], value), key
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["nemodiff"]["merged_adapter"]["lossless_against_base"] is False
    ids = torch.tensor([[11, MASK, 13, MASK, 15]])
    with torch.no_grad(), adapter_tokens(dlm.hf, torch.ones(1, 5, dtype=torch.bool)):
        on = dlm.hf(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, on, rtol=1e-4, atol=1e-4)


def test_hub_push_sends_the_adapter_alone(drafter, tmp_path, hub):  # noqa: F811 (fixture)
    base, dlm = drafter
    out = export_adapter(dlm, tmp_path / "adapter_hub", base_path=str(base), remote_code=True)
    plan = push_to_hub(out, "acme/drafter", private=True, token="hf_x")
    files = hub.committed_files()
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", MODELING_FILE} <= set(files)
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files)
    weights = len(files["adapter_model.safetensors"])
    base_weights = (base / "model.safetensors").stat().st_size
    assert weights < base_weights / 4, (weights, base_weights)
    assert plan["total_bytes"] == sum(len(v) for v in files.values())


def test_plain_peft_loads_the_adapter_files(drafter, tmp_path):
    """peft's own loader reads adapter_config.json + adapter_model.safetensors (every LoRA weight, by
    name) and applies the LoRA to every token: our model with the gate on everywhere, minus the trained
    mask row (peft does not know that key). Runs where peft is installed (it is optional)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from nemodiff_train.models.adapter import peft_state_dict

    base, dlm = drafter
    out = export_adapter(dlm, tmp_path / "adapter_peft", base_path=str(base), remote_code=False)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    ours = {k: v for k, v in peft_state_dict(dlm.adapter).items() if "lora_" in k}
    assert loaded.keys() == ours.keys()
    for key, value in ours.items():
        assert torch.equal(loaded[key], value), key
    ids = torch.tensor([[11, 12, 13, 14, 15]])  # no mask token: the mask row plays no part
    with torch.no_grad(), adapter_tokens(dlm.hf, torch.ones(1, 5, dtype=torch.bool)):
        on = dlm.hf(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, on, rtol=1e-4, atol=1e-4)

"""Remote code decodes like the package for eager-only and windowed architectures.

The export's ``modeling_nemodiff.py`` inlines the package's model adapter (models/cached.py), so a
``trust_remote_code`` model loaded with ``attn_implementation="eager"`` gets additive masks and
per-layer windows; before, its own copy passed boolean masks (eager then masks nothing: linear_spec
1/8 and quadratic_spec 0/8 lossless on a Llama) and a sliding cache.
"""

import json

import pytest
import torch

from nemodiff_train.decoding import DecodeConfig, generate
from nemodiff_train.export import export_dlm
from nemodiff_train.models.cached import HFCachedLM
from nemodiff_train.models.hf import DLMModel, DLMSettings, untie_output_head
from tests.helpers.arch_matrix import arch_model
from tests.unit.test_export_remote_code import load_remote_class
from tests.unit.test_export_support import one_thread  # noqa: F401  (autouse: one intra-op thread)

pytestmark = pytest.mark.unit
MASK = 3


@pytest.mark.parametrize("name", ["gemma2", "llama_untied"])
def test_remote_code_in_eager_equals_our_decoders(tmp_path, name):
    model = arch_model(name, attn_implementation="eager", initializer_range=0.1)
    untie_output_head(model)
    dlm = DLMModel(model, DLMSettings(mask_token_id=MASK, train_block_size=8, inference_block_size=4))
    out = export_dlm(dlm, tmp_path / name, remote_code=True)
    cls_name = json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].split(".")[1]
    remote = load_remote_class(out, cls_name).from_pretrained(out, attn_implementation="eager").eval()
    assert remote.config._attn_implementation == "eager"
    prompt = list(range(10, 30))  # longer than gemma2's window of 8
    ar = generate(HFCachedLM(dlm), [prompt], "ar", DecodeConfig(max_new_tokens=12, block_size=4))[0].tokens
    for mode in ("ar", "linear_spec", "quadratic_spec"):
        got = remote.generate(torch.tensor([prompt]), mode=mode, max_new_tokens=12, block_size=4,
                              return_dict_in_generate=True)
        assert got.tokens[0] == ar, mode

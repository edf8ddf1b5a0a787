"""Remote code through transformers' own loader: ``trust_remote_code=True`` from the local export
directory, in a fresh interpreter where ``import nemodiff_train`` fails, reproduces our decoders in
every mode; without ``trust_remote_code`` the same directory loads as the plain base architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nemodiff_train.decoding import MODES, DecodeConfig, generate
from nemodiff_train.export import export_dlm
from nemodiff_train.models.cached import HFCachedLM
from tests.unit.test_export_support import make_dlm

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23]]
SETTINGS = {"max_new_tokens": 10, "block_size": 4, "threshold": 0.9, "eos_token_id": 2}

CHILD = r"""
import json, sys
sys.modules["nemodiff_train"] = None          # the remote code must not need our package
import torch
from transformers import AutoModelForCausalLM

out = {}
for path in sys.argv[2:]:
    plain = AutoModelForCausalLM.from_pretrained(path)          # no trust_remote_code: base class
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    prompts = json.loads(sys.argv[1])["prompts"]
    settings = json.loads(sys.argv[1])["settings"]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    res = {"plain_class": type(plain).__name__, "remote_class": type(model).__name__,
           "remote_module": type(model).__module__, "modes": {}}
    for mode in ["ar", "diffusion", "linear_spec", "quadratic_spec"]:
        got = model.generate(ids, attention_mask=mask, mode=mode, return_dict_in_generate=True, **settings)
        res["modes"][mode] = {"tokens": got.tokens, "forwards": [s["forwards"] for s in got.stats]}
    for rule in ["prefix", "prefix_ar"]:
        got = model.generate(ids, attention_mask=mask, mode="diffusion", commit_rule=rule,
                             return_dict_in_generate=True, **settings)
        res["modes"]["diffusion_" + rule] = {"tokens": got.tokens, "forwards": [s["forwards"] for s in got.stats]}
    out[path] = res
print("RESULT " + json.dumps(out))
"""


def test_trust_remote_code_reproduces_our_decoders(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = {}
        for family, tie, mask in (("qwen3", True, "add"), ("mistral", False, 5)):
            dlm = make_dlm(tmp_path, family, tie=tie, mask=mask)
            out = export_dlm(dlm, tmp_path / f"remote_{family}", remote_code=True)
            cases[str(out)] = (dlm, family)
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   HF_MODULES_CACHE=str(tmp_path / "modules"))
        env.pop("PYTHONPATH", None)
        arg = json.dumps({"prompts": PROMPTS, "settings": SETTINGS})
        res = subprocess.run([sys.executable, "-c", CHILD, arg, *cases], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=600)
        assert res.returncode == 0, res.stderr[-5000:]
        result = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
        assert (tmp_path / "modules" / "transformers_modules").is_dir()  # really went through dynamic modules
        rule_changed = []
        for path, (dlm, family) in cases.items():
            got = result[path]
            base = type(dlm.hf).__name__
            assert got["plain_class"] == base and got["remote_class"] == "NemoDiff" + base
            assert got["remote_module"].startswith("transformers_modules.")
            lm = HFCachedLM(dlm)
            cfg = DecodeConfig(max_new_tokens=10, block_size=4, threshold=0.9, eos_token_ids=(2,))
            for mode in MODES:
                ref = generate(lm, PROMPTS, mode, cfg)
                assert got["modes"][mode]["tokens"] == [r.tokens for r in ref], (family, mode)
                assert got["modes"][mode]["forwards"] == [r.stats.forwards for r in ref], (family, mode)
            # the commit rule reaches the remote decoder: an untrained model is never confident, so the
            # two rules commit different positions, and for one of the models that changes the output
            for rule in ["prefix", "prefix_ar"]:
                ref = generate(lm, PROMPTS, "diffusion", replace(cfg, commit_rule=rule))
                assert got["modes"]["diffusion_" + rule]["tokens"] == [r.tokens for r in ref], (family, rule)
                assert got["modes"]["diffusion_" + rule]["forwards"] == [r.stats.forwards for r in ref], (family, rule)
            rule_changed.append(got["modes"]["diffusion_prefix"]["tokens"] != got["modes"]["diffusion"]["tokens"])
        assert any(rule_changed)
    finally:
        torch.set_num_threads(n)

"""An export stops where ``nemodiff-eval`` stops: plain ``generate()`` and the remote code's
``generate(mode="diffusion")`` end at every token of the toolkit's stop set (EOS and ``<|im_end|>``).

A random tiny model rarely emits a stop token, so each test *plants* one: the head row of
``<|im_end|>`` becomes 1.5x the row of a token X that greedy decoding emits mid-answer, so
``<|im_end|>`` wins where X would have. Each test asserts that premise (the decoder really emits
``<|im_end|>`` before ``max_new_tokens``), so a change in the random model fails loudly instead of
passing without testing anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemodiff_train.decoding import DecodeConfig, generate
from nemodiff_train.models.loading import load_for_decoding
from nemodiff_train.models.stop_tokens import stop_token_ids
from nemodiff_train.export import export_dlm
from nemodiff_train.models.cached import HFCachedLM
from tests.unit.test_export_support import make_dlm
from tests.unit.test_export_support import one_thread  # noqa: F401  (autouse: one intra-op thread)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [11, 12, 13, 14, 15]
MAX_NEW = 16
BLOCK = 8


def _decode(lm, mode: str, stops: tuple[int, ...]) -> list[int]:
    cfg = DecodeConfig(max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.9, eos_token_ids=stops)
    return list(generate(lm, [PROMPT], mode, cfg)[0].tokens)


def _plant_im_end(dlm, mode: str) -> int:
    """Make ``<|im_end|>`` the greedy choice where ``mode`` first emits some mid-answer token; returns its id."""
    im_end = dlm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    free = _decode(HFCachedLM(dlm), mode, ())
    at = next(i for i in range(3, MAX_NEW) if free[i] not in free[:i])
    with torch.no_grad():
        head = dlm.hf.get_output_embeddings().weight
        assert head.data_ptr() != dlm.hf.get_input_embeddings().weight.data_ptr()  # untied: only the head moves
        head[im_end] = 1.5 * head[free[at]]
    return im_end


def _eval_stops_and_tokens(out: Path, mode: str) -> tuple[tuple[int, ...], list[int]]:
    """What nemodiff-eval does with the export: its stop ids and its decode of PROMPT in ``mode``."""
    dlm, lm, stops, _ = load_for_decoding(out, device="cpu")
    return stops, _decode(lm, mode, stops)


def test_plain_generate_stops_where_nemodiff_eval_stops(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dlm = make_dlm(tmp_path, "qwen3", tie=False)
    im_end = _plant_im_end(dlm, "ar")
    out = export_dlm(dlm, tmp_path / "out")

    stops, ours = _eval_stops_and_tokens(out, "ar")
    assert stops == stop_token_ids(dlm.tokenizer, dlm.hf.generation_config)
    assert dlm.tokenizer.eos_token_id in stops and im_end in stops
    assert ours[-1] == im_end and len(ours) < MAX_NEW  # the premise: the answer ends at <|im_end|>

    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == list(stops)
    tok = AutoTokenizer.from_pretrained(out)
    assert set(stops) <= set(tok.all_special_ids)
    assert tok.decode(ours, skip_special_tokens=True) == tok.decode(ours[:-1], skip_special_tokens=True)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
        # what an export with only the tokenizer's EOS in its generation config did: run past <|im_end|>
        eos_only = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                  eos_token_id=dlm.tokenizer.eos_token_id)
    assert plain[0, len(PROMPT):].tolist() == ours
    assert eos_only.shape[1] > plain.shape[1]


CHILD = r"""
import json, sys
sys.modules["nemodiff_train"] = None          # the remote code must not need our package
import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
args = json.loads(sys.argv[2])
got = model.generate(torch.tensor([args["prompt"]]), mode="diffusion", max_new_tokens=args["max_new"],
                     block_size=args["block"], return_dict_in_generate=True)
print("RESULT " + json.dumps(got.tokens[0]))
"""


def test_remote_code_diffusion_stops_where_nemodiff_eval_stops(tmp_path):
    dlm = make_dlm(tmp_path, "qwen3", tie=False)
    im_end = _plant_im_end(dlm, "diffusion")
    out = export_dlm(dlm, tmp_path / "remote", remote_code=True)
    stops, ours = _eval_stops_and_tokens(out, "diffusion")
    assert ours[-1] == im_end and len(ours) < MAX_NEW  # the premise

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", CHILD, str(out),
                          json.dumps({"prompt": PROMPT, "max_new": MAX_NEW, "block": BLOCK})],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    assert json.loads(line[len("RESULT "):]) == ours


def test_a_stop_token_that_is_not_special_becomes_special(tmp_path):
    from transformers import AutoTokenizer

    dlm = make_dlm(tmp_path, "qwen3", tie=False)
    plain_id = 50
    assert plain_id not in dlm.tokenizer.all_special_ids
    dlm.hf.generation_config.eos_token_id = [dlm.tokenizer.eos_token_id, plain_id]
    out = export_dlm(dlm, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(out)
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert plain_id in stops and set(stops) <= set(tok.all_special_ids)
    assert len(tok) == len(dlm.tokenizer)  # registered, not added: ids unchanged
    assert plain_id not in dlm.tokenizer.all_special_ids  # the live model's tokenizer is left alone


def test_embedded_model_export_lists_eos_and_im_end(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from nemodiff_train.assets import embedded_model_dir
    from nemodiff_train.models.hf import load_dlm

    dlm = load_dlm(embedded_model_dir())
    out = export_dlm(dlm, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(out)
    expected = (tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>"))
    assert expected == (0, 2)  # what nemodiff-eval stops at on the embedded model
    assert tuple(GenerationConfig.from_pretrained(out).eos_token_id) == expected
    assert set(expected) <= set(tok.all_special_ids)
    assert load_for_decoding(out, device="cpu")[2] == expected

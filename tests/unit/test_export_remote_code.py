"""The generated modeling_nemodiff.py: self-contained, and its generate(mode=...) equals our decoders.

Here the generated file is imported straight from the export directory (no transformers auto-class
registration, so other tests in this process are unaffected); the integration test loads it through
``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` in a fresh interpreter that
cannot import nemodiff_train.
"""

import ast
import re
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from nemodiff_train.decoding import MODES, DecodeConfig, generate
from nemodiff_train.export import ExportError, export_dlm
from nemodiff_train.export.inline import inline_decoding
from nemodiff_train.export.remote_code import MODELING_FILE, modeling_source
from nemodiff_train.models.cached import HFCachedLM
from tests.helpers.tiny_models import FAMILIES
from tests.unit.test_export_support import one_thread  # noqa: F401  (autouse: one intra-op thread)
from tests.unit.test_export_support import make_dlm

pytestmark = pytest.mark.unit

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23]]
EOS = 2


def load_remote_class(out, name):
    spec = importlib.util.spec_from_file_location(f"nemodiff_remote_{out.name}", out / MODELING_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return getattr(module, name)


def left_pad(prompts, pad=0):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


SETTINGS = [
    dict(max_new_tokens=11, block_size=4, threshold=0.9),
    dict(max_new_tokens=9, block_size=3, threshold=0.05, temperature=0.8, top_p=0.9, seed=3),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_generate_equals_our_decoders_in_every_mode(tmp_path, family):
    tie, mask = {"qwen3": (True, "add"), "llama": (False, 5), "qwen2": (True, 5), "mistral": (False, "add")}[family]
    dlm = make_dlm(tmp_path, family, tie=tie, mask=mask)
    out = export_dlm(dlm, tmp_path / f"rc_{family}", remote_code=True)
    cfg = json.loads((out / "config.json").read_text())
    cls_name = cfg["auto_map"]["AutoModelForCausalLM"].split(".")[1]
    assert cls_name == "NemoDiff" + type(dlm.hf).__name__
    model = load_remote_class(out, cls_name).from_pretrained(out).eval()
    assert isinstance(model, type(dlm.hf))
    lm = HFCachedLM(dlm)
    ids, attn = left_pad(PROMPTS)
    for mode in MODES:
        for kw in SETTINGS:
            ref = generate(lm, PROMPTS, mode, DecodeConfig(eos_token_ids=(EOS,), **kw))
            got = model.generate(ids, attention_mask=attn, mode=mode, eos_token_id=EOS,
                                 return_dict_in_generate=True, **kw)
            assert got.tokens == [r.tokens for r in ref], (mode, kw)
            assert [s["forwards"] for s in got.stats] == [r.stats.forwards for r in ref], (mode, kw)
            seq = got.sequences
            assert torch.equal(seq[:, :ids.shape[1]], ids)
            for i, r in enumerate(ref):
                n = len(r.tokens)
                assert seq[i, ids.shape[1]:ids.shape[1] + n].tolist() == r.tokens
    # a single unpadded prompt, tensor output, defaults from config/generation config
    one = model.generate(torch.tensor([PROMPTS[0]]), mode="linear_spec", max_new_tokens=6)
    ref = generate(lm, PROMPTS[:1], "linear_spec",
                   DecodeConfig(max_new_tokens=6, block_size=dlm.settings.inference_block_size, eos_token_ids=(EOS,)))
    assert one[0, len(PROMPTS[0]):len(PROMPTS[0]) + len(ref[0].tokens)].tolist() == ref[0].tokens


def test_generate_without_mode_is_transformers_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    dlm = make_dlm(tmp_path, "qwen3")
    out = export_dlm(dlm, tmp_path / "rc_plain", remote_code=True)
    remote = load_remote_class(out, "NemoDiffQwen3ForCausalLM").from_pretrained(out).eval()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code: the base class
    assert type(plain).__name__ == "Qwen3ForCausalLM"
    ids = torch.tensor([PROMPTS[0]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(remote.generate(ids, **kw), plain.generate(ids, **kw))
    with pytest.raises(ValueError, match="unknown decoding mode"):
        remote.generate(ids, mode="beam")
    with pytest.raises(TypeError, match="unsupported arguments.*num_beams"):
        remote.generate(ids, mode="ar", num_beams=2)


def test_generated_file_is_self_contained():
    source = modeling_source("llama", "0.0.0")
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import at line {node.lineno}"
            roots = [(node.module or "").split(".")[0]]
        elif isinstance(node, ast.Import):
            roots = [a.name.split(".")[0] for a in node.names]
        else:
            continue
        assert set(roots) <= {"__future__", "torch", "transformers", "typing", "dataclasses", "inspect"}, roots
    assert "from transformers import LlamaForCausalLM as _NemoDiffBase" in source
    _, _, modules = inline_decoding()
    # every decoding module the package imports is inlined, dependencies first
    assert modules[-1] == "__init__"
    for m in ("ar", "diffusion", "linear_spec", "quadratic_spec", "config", "result"):
        assert m in modules
    assert modules.index("batching") < modules.index("ar")


def _fake_package(tmp_path, files):
    pkg = tmp_path / "pkg"
    pkg.mkdir(parents=True)
    for name, text in files.items():
        (pkg / f"{name}.py").write_text(text)
    return pkg


def test_inliner_rejects_what_it_cannot_inline(tmp_path):
    pkg = _fake_package(tmp_path, {"__init__": "from .a import f\nfrom .b import g\n",
                                   "a": "def f():\n    return 1\n", "b": "def f():\n    return 2\ng = f\n"})
    with pytest.raises(ExportError, match="'f' is defined in both decoding/a.py and decoding/b.py"):
        inline_decoding(pkg)
    pkg2 = _fake_package(tmp_path / "x", {"__init__": "import numpy\n"})
    with pytest.raises(ExportError, match="imports 'numpy'"):
        inline_decoding(pkg2)
    pkg3 = _fake_package(tmp_path / "y", {"__init__": "from .a import f as h\nx = h()\n",
                                          "a": '"""doc"""\nfrom __future__ import annotations\n__all__ = ["f"]\n'
                                               "def f():\n    return 1\n"})
    imports, body, modules = inline_decoding(pkg3)
    namespace = {}
    exec(compile(body, "inlined", "exec"), namespace)
    assert namespace["x"] == 1 and modules == ["a", "__init__"]


def test_unsupported_architecture_fails_before_writing(tmp_path):
    dlm = make_dlm(tmp_path, "qwen3")
    dlm.hf.config.model_type = "not_a_model"
    with pytest.raises(ExportError, match="not_a_model"):
        export_dlm(dlm, tmp_path / "out", remote_code=True)
    assert not (tmp_path / "out").exists()


def test_remote_static_cache_adapter_equals_our_decoders(tmp_path):
    """The inlined static-shape adapter (what remote code decodes with on CUDA), run on a CPU here."""
    dlm = make_dlm(tmp_path, "llama", tie=False, mask=5)
    out = export_dlm(dlm, tmp_path / "rc_static", remote_code=True)
    cls_name = json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].split(".")[1]
    model = load_remote_class(out, cls_name).from_pretrained(out).eval()
    remote = sys.modules[type(model).__module__]
    static = remote.StaticCachedLM(model, dlm.settings.mask_token_id, capacity=128)
    lm = HFCachedLM(dlm)
    for mode in MODES:
        cfg = DecodeConfig(eos_token_ids=(EOS,), **SETTINGS[0])
        ref = generate(lm, PROMPTS, mode, cfg)
        got = remote.generate(static, PROMPTS, mode, remote.DecodeConfig(eos_token_ids=(EOS,), **SETTINGS[0]))
        assert [g.tokens for g in got] == [r.tokens for r in ref], mode
    # off CUDA, generate(mode=...) keeps the dynamic adapter whatever static_cache says
    assert type(model._nemodiff_lm(dlm.settings.mask_token_id, PROMPTS, "ar", cfg, {})) is remote.HFCachedLM


def _kept_statements(file: Path) -> list[str]:
    """The source text of every top-level statement the inliner keeps (not the docstring, imports, ``__all__``)."""
    src = file.read_text()
    tree = ast.parse(src)
    kept = []
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            continue
        kept.append(ast.get_source_segment(src, node, padded=True))
    return kept


def test_inlined_code_is_byte_identical_to_the_package_sources():
    """Every definition of every inlined module (decoders, the CachedLM adapter and what it imports) is
    in modeling_nemodiff.py byte for byte, in the section named after its file, in source order."""
    from nemodiff_train.export.inline import DECODING_DIR, MODELS_DIR

    source = modeling_source("qwen3", "0.0.0")
    sections = re.split(r"\n# -{96}\n# inlined from nemodiff_train/(\S+)\.py\n# -{96}\n", source)
    by_file = dict(zip(sections[1::2], sections[2::2]))
    assert {"decoding/__init__", "decoding/ar", "models/cached", "models/attention", "models/arch"} <= set(by_file)
    for name, body in by_file.items():
        package, module = name.split("/")
        file = (DECODING_DIR if package == "decoding" else MODELS_DIR) / f"{module}.py"
        pos = 0
        for stmt in _kept_statements(file):
            at = body.find(stmt, pos)
            assert at >= 0, f"{file}: a statement is not inlined verbatim:\n{stmt[:300]}"
            pos = at + len(stmt)

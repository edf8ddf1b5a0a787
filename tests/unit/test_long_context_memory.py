"""tools/long_context_memory.py: the per-GPU memory formula of docs/long_context.md and its table."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import long_context_memory as lcm  # noqa: E402

M8B = lcm.Shape(**lcm.KNOWN["mistralai/Ministral-3-8B-Base-2512"])
NLD8B = lcm.Setup(tp=4, pp=1, gpus=64, distributed_optimizer=True, recompute=None)


def _bytes(m, s, cp, length, recompute=None):
    return lcm.static_bytes(m, s) + length * lcm.bytes_per_length(m, s, cp, recompute)


def test_the_8b_shape_and_static_memory():
    assert 8.45e9 < M8B.params < 8.55e9  # the recipe's ~8.5B
    local = M8B.params / 4
    assert lcm.static_bytes(M8B, NLD8B) == pytest.approx(local * 6 + local * 12 / 16)
    assert lcm.static_bytes(M8B, replace(NLD8B, distributed_optimizer=False)) == pytest.approx(local * 18)


def test_the_formula_by_hand_at_cp1_and_cp8():
    # per position and layer: (14·4096 + 6·1024 + 6·14336) / 4 = 37,376 B; logits 32,768 × 6 = 196,608 B
    per_pos = 34 * 37376 + 196608
    assert lcm.bytes_per_length(M8B, NLD8B, 1, None) == pytest.approx(2 * per_pos)
    # cp = 8: a quarter of the positions, plus the gathered K/V of 34 layers: 2 (K,V) × 2 B × 2 × 256 per L
    assert lcm.bytes_per_length(M8B, NLD8B, 8, None) == pytest.approx(2 / 8 * per_pos + 34 * 2048)
    full = 34 * 2 * 4096 / 4 + 37376 + 196608  # layer inputs + one recomputed layer + logits
    assert lcm.bytes_per_length(M8B, NLD8B, 8, "full") == pytest.approx(2 / 8 * full + 2048)


def test_the_table_is_consistent_with_the_recipes():
    budget = 80 * lcm.GIB * 0.9 - 4 * lcm.GIB
    assert _bytes(M8B, NLD8B, 1, 4096) < budget  # nld_8b_pretrain fits (its header: ~35 GB)
    assert _bytes(M8B, NLD8B, 8, 32768) < budget  # nld_8b_longctx fits at cp = 8 ...
    assert _bytes(M8B, NLD8B, 1, 32768) > budget  # ... and would not without CP
    rows = lcm.table(M8B, NLD8B)
    assert [r["cp"] for r in rows] == [1, 2, 4, 8] and [r["gpus_per_replica"] for r in rows] == [4, 8, 16, 32]
    lengths = [r["L_recipe_recompute"] for r in rows]
    assert lengths == sorted(lengths) and lengths[-1] > 6 * lengths[0]  # CP buys length, a bit sub-linearly
    for r in rows:
        for key, rc in (("L_recipe_recompute", None), ("L_full_recompute", "full")):
            L, cp = r[key], r["cp"]
            assert L % (128 * cp) == 0 and _bytes(M8B, NLD8B, cp, L, rc) <= budget
            assert _bytes(M8B, NLD8B, cp, L + 128 * cp, rc) > budget  # the longest, to its rounding step
        assert r["L_full_recompute"] > r["L_recipe_recompute"]


def test_cli_reads_the_recipe(capsys):
    assert lcm.main(["recipe=nld_8b_longctx", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["tp"] == 4 and out["setup"]["gpus"] == 64  # the recipe's "# Hardware: 8 nodes x 8"
    assert out["rows"] == lcm.table(M8B, NLD8B)
    assert lcm.main(["recipe=nld_8b_longctx", "--cp", "1", "8"]) == 0
    text = capsys.readouterr().out
    assert "| 8 | 32 | 134,144 |" in text and "beyond the base model's 262,144 positions" in text


def test_unknown_model_needs_its_config(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--hf-config"):
        lcm.main(["recipe=tiny_cpu", "engine=megatron", "model.path=org/unknown", "--gpus", "8"])
    conf = {"text_config": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    shape = lcm.Shape.from_hf_config(conf)
    assert shape.head_dim == 16 and shape.kv_heads == 2 and shape.max_positions is None
    assert lcm.main(["recipe=tiny_cpu", "engine=megatron", "model.path=org/unknown", "--gpus", "8",
                     "--hf-config", str(tmp_path / "config.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == {**vars(shape)}


def test_the_published_figures_are_the_tools():
    """README's table, docs/long_context.md's and the 8B recipes' headers quote this formula's numbers."""
    root = Path(__file__).resolve().parents[2]
    readme, doc = (root / "README.md").read_text(), (root / "docs" / "long_context.md").read_text()
    headers = {n: (root / "recipes" / f"{n}.yaml").read_text() for n in ("nld_8b_pretrain", "nld_8b_sft",
                                                                         "nld_8b_longctx")}
    for r in lcm.table(M8B, NLD8B):
        no, full = f"{r['L_recipe_recompute']:,}", f"{r['L_full_recompute']:,}"
        assert f"| {r['cp']} | {r['gpus_per_replica']} | {no} | {full}" in readme
        assert f"| {r['cp']} | {r['gpus_per_replica']} | {no} | {full}" in doc
        for name, text in headers.items():
            assert f"cp={r['cp']}: {no} / {full}" in text.replace("\n#  ", "").replace("engine.cp=1", "cp=1"), name

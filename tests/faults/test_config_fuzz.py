"""Config fuzzing: 200 seeded random mutations of the real recipes through the real loader.

Each mutated config must either be rejected at start-up with a :class:`ConfigError` that names the
mutated key, or be accepted (and then start: one accepted shape is run for real below). Nothing may
escape as another exception type: that would be a traceback from deep inside training.
"""

from __future__ import annotations

import random
import re

import pytest
from omegaconf import OmegaConf

from nemodiff_train.cli.train import preflight
from nemodiff_train.config.errors import ConfigError
from nemodiff_train.config.load import CONF_DIR, list_recipes, register_schema, to_config

from .harness import base_args, check_ok, launch

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # 200 composed configs plus training runs

N_CASES = 200
WRONG_TYPES = ["abc", [1, 2], {"a": 1}, 1.5, "1e400"]


def _compose_raw(recipe: str):
    from hydra import compose, initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=[f"recipe={recipe}"])


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], node


def mutations(raw: dict, rng: random.Random) -> list[tuple[str, object]]:
    """One or two ``(dotted key, new value)`` edits of the kinds the issue lists."""
    leaves = [(k, v) for k, v in _leaves(raw) if k != "hydra" and not k.startswith("hydra.")]
    numeric = [(k, v) for k, v in leaves if isinstance(v, (int, float)) and not isinstance(v, bool)]
    n_stages = len(raw["stages"])
    s = rng.randrange(n_stages)
    kind = rng.choice(["type", "unknown", "negative", "zero", "block", "micro", "missing_file", "missing_model", "nan"])
    if kind == "type":
        key, _ = rng.choice(leaves)
        return [(key, rng.choice(WRONG_TYPES))]
    if kind == "unknown":
        section = rng.choice(["optim", "diffusion", "model", "engine", "checkpoint", f"stages.{s}", f"stages.{s}.data"])
        return [(f"{section}.{rng.choice(['learning_rate', 'lr_max', 'blocksize', 'seqlen', 'batch'])}", 1)]
    if kind in ("negative", "zero", "nan"):
        key, value = rng.choice(numeric)
        return [(key, {"negative": -abs(value or 1) - rng.randint(0, 9), "zero": 0, "nan": float("nan")}[kind])]
    if kind == "block":  # often not a divisor of seq_len: allowed (documents are cut into blocks anyway)
        return [("diffusion.block_size", rng.choice([3, 5, 7, 12, 100, 1000]))]
    if kind == "micro":
        g = raw["stages"][s]["global_batch_size"]
        return [(f"stages.{s}.micro_batch_size", rng.choice([m for m in range(2, g + 3) if g % m] or [g + 1]))]
    if kind == "missing_file":
        return [(f"stages.{s}.data.sources", [f"/nonexistent/dir/{rng.randrange(10**6)}.jsonl"])]
    return [("model.path", f"/nonexistent/model_{rng.randrange(10**6)}")]


def _names_key(message: str, key: str) -> bool:
    msg = re.sub(r"\[(\d+)\]", r".\1", message)
    parent, _, last = key.rpartition(".")
    return key in msg or (last in msg and (not parent or parent in msg or parent.split(".")[0] in msg)) \
        or any(key.startswith(p) and p in msg for p in re.findall(r"[a-z_]+(?:\.[a-z0-9_]+)+", msg))


def run_fuzz(n: int = N_CASES, seed: int = 0) -> dict:
    """Returns counts and the cases that broke the promise (see the module docstring)."""
    rng = random.Random(seed)
    recipes = list_recipes()
    raws = {r: OmegaConf.to_container(_compose_raw(r), resolve=False) for r in recipes}
    out = {"cases": 0, "clean_error": 0, "accepted": 0, "broken": [], "accepted_examples": []}
    for _ in range(n):
        recipe = rng.choice(recipes)
        edits = mutations(raws[recipe], rng) + (mutations(raws[recipe], rng) if rng.random() < 0.2 else [])
        cfg = OmegaConf.create(raws[recipe])
        for key, value in edits:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        out["cases"] += 1
        try:
            preflight(to_config(cfg))
        except ConfigError as e:
            if any(_names_key(str(e), k) for k, _ in edits):
                out["clean_error"] += 1
            else:
                out["broken"].append((recipe, edits, f"error does not name the key: {e}"))
        except Exception as e:  # noqa: BLE001 - anything else is the defect this test looks for
            out["broken"].append((recipe, edits, f"{type(e).__name__}: {e}"))
        else:
            out["accepted"] += 1
            out["accepted_examples"].append((recipe, edits))
    return out


def test_200_config_mutations_fail_naming_the_key_or_are_accepted():
    result = run_fuzz()
    assert result["cases"] == N_CASES
    assert not result["broken"], "\n".join(map(str, result["broken"][:10]))
    assert result["clean_error"] > N_CASES // 2 and result["accepted"] > 0  # both outcomes are exercised


def test_an_accepted_odd_block_size_really_runs(assets, tmp_path):
    run = tmp_path / "block5"
    check_ok(launch(base_args(assets, run, "diffusion.block_size=5", "stages.0.steps=2", "export.at_end=false",
                              "logging.val_every=0"), run))


def test_missing_files_fail_at_start_up_naming_the_key(assets, tmp_path):
    run = tmp_path / "missing"
    r = launch(base_args(assets, run, f"stages.0.data.val_sources=[{tmp_path / 'nope.jsonl'}]"), run)
    assert r.returncode == 2 and "stages.0.data.val_sources.0" in r.output and "Traceback" not in r.output
    assert not (run / "checkpoints").exists()

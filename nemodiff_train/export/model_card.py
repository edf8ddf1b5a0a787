"""The model card (``README.md``) of an export: Hub metadata, recipe, data, usage, measured speed/accuracy.

The YAML header is huggingface_hub's ``ModelCardData`` (base model, license, data sets, tags and a
``model-index`` of the evaluation, :mod:`.card_metadata`), so the Hub shows the results as its
evaluation widget; the body is for people. The card is rebuilt from the export's own
``config.json["nemodiff"]`` record, so it can be refreshed after the fact (e.g. once ``nemodiff-eval``
has written ``eval.json``) with :func:`write_model_card`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from ..decoding.modes import ALL_MODES
from .card_metadata import card_data
from .errors import ExportError

__all__ = ["read_eval_rows", "render_model_card", "write_model_card", "eval_table"]

# eval.json keys that are bookkeeping, not accuracy metrics
_NOT_METRICS = {
    "mode", "task", "samples", "generated_tokens", "forwards", "prefill_forwards", "tpf", "tpf_incl_prefill",
    "tokens_per_s", "decode_seconds", "lossless", "requested", "block_size", "threshold", "temperature",
    "max_new_tokens", "batch_size", "seed", "metric_names", "primary_metric", "sweep",
}


def read_eval_rows(path: Path) -> list[dict[str, Any]]:
    """Load and check an evaluator ``eval.json`` (a list of objects with at least ``mode``)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"eval_json {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"eval_json {path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "mode" in r for r in rows):
        raise ExportError(f"eval_json {path} is not a list of objects with a 'mode' key (the evaluator's eval.json)")
    return rows


def _metric_names(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        declared = r.get("metric_names")
        candidates = declared if isinstance(declared, list) else [
            k for k, v in r.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        for k in candidates:
            if k not in names:
                names.append(k)
    return names


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def eval_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: mode × task × samples × TPF × tokens/s × metrics × lossless."""
    rows = [r for r in rows if not r.get("sweep")]  # sweep points (extra τ / block sizes) stay in eval.json
    metrics = _metric_names(rows)
    head = ["mode", "task", "samples", "TPF", "tokens/s", *metrics, "lossless"]
    order = {m: i for i, m in enumerate(ALL_MODES)}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (str(r.get("task")), order.get(r.get("mode"), 99))):
        lossless = r.get("lossless")
        cells = [f"`{r.get('mode')}`", str(r.get("task", "–")), _fmt(r.get("samples")), _fmt(r.get("tpf")),
                 _fmt(r.get("tokens_per_s"), 1), *(_with_interval(r, m) for m in metrics),
                 f"{lossless:.0%}" if isinstance(lossless, (int, float)) and not isinstance(lossless, bool) else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_interval(row: dict, metric: str) -> str:
    """``0.675 [0.61, 0.74]``: the accuracy and its 95 % interval (eval.json's ``<metric>_ci95``)."""
    ci = row.get(f"{metric}_ci95")
    return _fmt(row.get(metric), 3) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _settings_of(rows: list[dict]) -> str:
    keys = ("block_size", "threshold", "commit_rule", "temperature", "max_new_tokens", "dtype", "device")
    seen = {k: sorted({str(r[k]) for r in rows if r.get(k) is not None}) for k in keys}
    return ", ".join(f"{k} {'/'.join(v)}" for k, v in seen.items() if v)


def _training(meta: dict) -> str:
    out = ["## Training", ""]
    out.append(f"- Recipe: `{meta.get('recipe') or 'unknown'}`")
    base = meta.get("base_model")
    out.append(f"- Base model: `{base}`" if base else "- Base model: unknown")
    for key, label in (("alpha", "Diffusion loss weight α"), ("beta", "AR loss weight β"),
                       ("noise_schedule", "Noise schedule")):
        if meta.get(key) is not None:
            out.append(f"- {label}: {meta[key]}")
    steps, tokens = meta.get("training_steps"), meta.get("training_tokens")
    out.append(f"- Training steps: {steps if steps is not None else 'unknown'}")
    out.append(f"- Training tokens: {f'{tokens:,}' if isinstance(tokens, int) else 'unknown'}"
               + (" (clean tokens consumed; the two-stream input doubles the tokens per forward)"
                  if isinstance(tokens, int) else ""))
    stages = meta.get("stages") or []
    if stages:
        out += ["", "| stage | kind | steps | sequence length | global batch | data |", "|---|---|---|---|---|---|"]
        for s in stages:
            data = ", ".join(f"`{x}`" for x in s.get("sources") or []) or "–"
            out.append(f"| {s.get('name', '–')} | {s.get('kind', '–')} | {_fmt(s.get('steps'))} | "
                       f"{_fmt(s.get('seq_len'))} | {_fmt(s.get('global_batch_size'))} | {data} |")
    elif meta.get("data_sources"):
        out.append("- Data: " + ", ".join(f"`{x}`" for x in meta["data_sources"]))
    else:
        out.append("- Data: unknown")
    return "\n".join(out)


def _usage(meta: dict, remote: bool, repo: str) -> str:
    block = meta.get("inference_block_size", 32)
    text = f"""## How to use

### 1. As a plain autoregressive model (transformers only)

The weights are a standard `{meta.get('architecture', 'causal LM')}` checkpoint; AR decoding needs nothing else:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

revision = "main"   # pin a commit hash of this repository for reproducible results
tok = AutoTokenizer.from_pretrained("{repo}", revision=revision)
model = AutoModelForCausalLM.from_pretrained("{repo}", revision=revision)
ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=64, do_sample=False)[0]))
```

### 2. With nemodiff's decoders (AR, block diffusion, linear / quadratic self-speculation)

```python
from huggingface_hub import snapshot_download
from nemodiff_train.models.hf import load_dlm
from nemodiff_train.models.cached import HFCachedLM
from nemodiff_train.decoding import DecodeConfig, generate
from nemodiff_train.models.stop_tokens import stop_token_ids   # EOS and <|im_end|>, as nemodiff-eval

dlm = load_dlm(snapshot_download("{repo}", revision="main"))   # load_dlm reads a local directory
lm = HFCachedLM(dlm)
prompt = dlm.tokenizer("def fibonacci(n):").input_ids
cfg = DecodeConfig(max_new_tokens=64, block_size={block}, threshold=0.9,
                   eos_token_ids=stop_token_ids(dlm.tokenizer, dlm.hf.generation_config))
for mode in ("ar", "diffusion", "linear_spec", "quadratic_spec"):
    out = generate(lm, [prompt], mode, cfg)[0]
    print(mode, out.stats.tpf, dlm.tokenizer.decode(out.tokens))
```

or measure every mode: `nemodiff-eval model=<dir> modes=[ar,diffusion,linear_spec,quadratic_spec] out=<dir>`.
"""
    if remote:
        text += f"""
### 3. With the bundled remote code (no nemodiff install)

`modeling_nemodiff.py` carries the same four decoders (inlined from nemodiff at export time):

```python
# trust_remote_code runs this repository's modeling_nemodiff.py: pin the revision you have read
model = AutoModelForCausalLM.from_pretrained("{repo}", revision=revision, trust_remote_code=True)
out = model.generate(ids, mode="diffusion", max_new_tokens=64, block_size={block}, threshold=0.9)
# left to right, the AR view where no mask reaches the threshold (nemodiff's docs/decoding.md, "Commit rule")
out = model.generate(ids, mode="diffusion", max_new_tokens=64, commit_rule="prefix_ar")
out = model.generate(ids, mode="linear_spec", max_new_tokens=64)   # equals greedy AR output
```

`generate()` without `mode` is transformers' standard generation (AR).
"""
    else:
        text += ("\nThis export carries no remote code; re-export with `remote_code=true` to get "
                 "`generate(mode=...)` without installing nemodiff.\n")
    return text


def render_model_card(meta: dict[str, Any], rows: list[dict] | None = None, remote_code: bool = False,
                      repo: str = "path/or/repo-id") -> str:
    """The README text for an export's ``nemodiff`` record and optional eval rows."""
    title = meta.get("recipe") or "nemodiff DLM"
    settings = "\n".join([
        "| setting | value |", "|---|---|",
        f"| mask token id | {meta.get('mask_token_id')} |",
        f"| training block size | {meta.get('train_block_size')} |",
        f"| inference block size (default) | {meta.get('inference_block_size')} |",
        f"| attention pattern (training) | `{meta.get('attention_pattern')}` |",
        f"| weights dtype | {meta.get('export_dtype', '–')} |",
        f"| nemodiff version | {meta.get('nemodiff_version', '–')} |",
    ])
    header = card_data(meta, rows, _metric_names([r for r in rows or [] if not r.get("sweep")])).to_yaml()
    parts = [
        "---", header, "---", "", f"# {title}", "",
        "A diffusion language model converted from an autoregressive LM with "
        "nemodiff-train (joint AR + masked-diffusion training, the "
        "Nemotron-Labs-Diffusion / Efficient-DLM recipe). One set of weights decodes in four modes: plain AR, "
        "block diffusion, and linear or quadratic self-speculation (diffusion drafts, AR verifies; lossless "
        "at temperature 0). The DLM settings live in `config.json` under `nemodiff`.", "",
        settings, "", _training(meta), "",
    ]
    parts.append("## Evaluation")
    parts.append("")
    if rows:
        parts += [eval_table(rows), "",
                  "TPF = generated tokens / model forwards, the prefill forward excluded; tokens/s = generated "
                  "tokens / decoding wall time; *lossless* = share of samples whose output equals AR greedy "
                  "decoding token for token (self-speculation modes); [low, high] = 95 % interval of the "
                  "accuracy over the samples." + (" `base` = the untouched base model decoded AR on the same rows "
                  "(not in the model-index: it is not this model's result)." if any(r.get("mode") == "base"
                                                                                     for r in rows) else ""), ""]
        settings_line = _settings_of(rows)
        if settings_line:
            parts += [f"Settings: {settings_line}.", ""]
    else:
        parts += ["Not measured for this export; run `nemodiff-eval model=<dir> out=<dir>` and refresh this card "
                  "with `nemodiff_train.export.write_model_card(<dir>, eval_json=<dir>/eval.json)`.", ""]
    parts.append(_usage(meta, remote_code, repo))
    return str(ModelCard("\n".join(parts).rstrip() + "\n"))


def write_model_card(folder: str | Path, *, eval_json: str | Path | None = None, rows: list[dict] | None = None,
                     metadata: dict | None = None, repo: str | None = None) -> Path:
    """(Re)write ``folder/README.md``.

    Args:
        folder: an export directory (its ``config.json["nemodiff"]`` is used when ``metadata`` is None).
        eval_json: an evaluator ``eval.json`` to tabulate (or ``rows`` already read).
        repo: the Hub repo id to show in the usage snippets.
    """
    folder = Path(folder)
    if metadata is None:
        cfg_file = folder / "config.json"
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"{cfg_file} is unreadable ({type(e).__name__}: {e})") from None
        metadata = dict(cfg.get("nemodiff") or {})
        metadata.setdefault("architecture", (cfg.get("architectures") or ["causal LM"])[0])
    else:
        metadata = dict(metadata)
        if "architecture" not in metadata and (folder / "config.json").is_file():
            archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
            if archs:
                metadata["architecture"] = archs[0]
    if rows is None and eval_json is not None:
        rows = read_eval_rows(Path(eval_json))
    text = render_model_card(metadata, rows, remote_code=(folder / "modeling_nemodiff.py").is_file(),
                             repo=repo or "path/or/repo-id")
    target = folder / "README.md"
    tmp = target.with_name(f".README.md.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(target)
    return target

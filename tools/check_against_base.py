"""Check an evaluation's self-speculation outputs against plain transformers ``generate()`` of a base model.

Self-speculation at temperature 0 is lossless: its output is the AR greedy output. For a drafter
adapter (docs/adapters.md) the AR mode is the untouched base, so ``linear_spec`` and ``quadratic_spec``
must reproduce what the ORIGINAL checkpoint writes with nothing of this toolkit involved. This tool
loads the base with ``AutoModelForCausalLM`` alone, greedy-decodes every prompt of ``samples.jsonl``
(written by ``nemodiff-eval``) with ``generate()``, and compares token for token, up to and including
the first stop token and within the evaluation's ``max_new_tokens``. Only the settings come from this
package (the export's mask token, the evaluator's stop tokens); the decoding is transformers' alone.

    python tools/check_against_base.py runs/demo_adapter/eval --base nemodiff_train/assets/tiny_qwen3

Exit status 0 when every compared sample matches, 1 otherwise (the first mismatches are printed).
The mask token is banned from ``generate()`` (``bad_words_ids``), as the decoders never emit it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_dir", type=Path, help="nemodiff-eval output (eval.json, samples.jsonl)")
    parser.add_argument("--base", type=Path, required=True, help="the untouched base model's HF directory")
    parser.add_argument("--modes", nargs="+", default=["linear_spec", "quadratic_spec"])
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from nemodiff_train.models.loading import resolve_model_dir

    rows = json.loads((args.eval_dir / "eval.json").read_text())
    settings = {(r["task"], r["mode"]): r for r in rows if r.get("sweep") is None}
    samples = [json.loads(line) for line in (args.eval_dir / "samples.jsonl").read_text().splitlines()]
    samples = [s for s in samples if s["mode"] in args.modes and (s["task"], s["mode"]) in settings]
    if not samples:
        print(f"no {args.modes} samples at the main setting in {args.eval_dir}", file=sys.stderr)
        return 1
    model_dir = resolve_model_dir(json.loads((args.eval_dir / "eval_config.json").read_text())["model"])
    mask_id, eos = _mask_and_stop_ids(model_dir)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    references: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    checked = mismatched = 0
    for s in samples:
        limit = int(settings[(s["task"], s["mode"])]["max_new_tokens"])
        key = (s["task"], tuple(s["prompt_ids"]))
        if key not in references:
            ids = torch.tensor([s["prompt_ids"]])
            with torch.no_grad():
                out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit, do_sample=False,
                                    bad_words_ids=[[mask_id]], eos_token_id=list(eos), pad_token_id=eos[0])
            references[key] = _cut(out[0, ids.shape[1]:].tolist(), eos, limit)
        ref = references[key]
        checked += 1
        if s["output_ids"] != ref:
            mismatched += 1
            if mismatched <= 5:
                first = next((i for i, (a, b) in enumerate(zip(s["output_ids"], ref)) if a != b),
                             min(len(s["output_ids"]), len(ref)))
                print(f"MISMATCH {s['task']} #{s['index']} {s['mode']}: first difference at token {first}")
    print(f"{checked - mismatched} of {checked} samples ({', '.join(args.modes)}) equal transformers generate() "
          f"of {args.base}, token for token")
    return 0 if mismatched == 0 else 1


def _cut(tokens: list[int], eos: tuple[int, ...], limit: int) -> list[int]:
    """Up to and including the first stop token, at most ``limit`` tokens (what the decoders return)."""
    out = []
    for t in tokens[:limit]:
        out.append(t)
        if t in eos:
            break
    return out


def _mask_and_stop_ids(model_dir: Path) -> tuple[int, tuple[int, ...]]:
    """The evaluated export's mask token (its ``nemodiff`` record) and the stop tokens the evaluator used."""
    from transformers import AutoTokenizer, GenerationConfig

    from nemodiff_train.models.stop_tokens import stop_token_ids

    record = json.loads((model_dir / "config.json").read_text()).get("nemodiff") or {}
    if "mask_token_id" not in record:
        raise SystemExit(f"{model_dir}/config.json records no nemodiff.mask_token_id: not an export of this toolkit")
    generation = GenerationConfig.from_pretrained(model_dir) if (model_dir / "generation_config.json").is_file() else None
    stops = stop_token_ids(AutoTokenizer.from_pretrained(model_dir), generation)
    if not stops:
        raise SystemExit(f"{model_dir} names no stop token (tokenizer eos, generation_config.json)")
    return int(record["mask_token_id"]), stops


if __name__ == "__main__":
    sys.exit(main())

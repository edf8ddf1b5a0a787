#!/usr/bin/env bash
# The "oldest" job: the lowest versions pyproject.toml admits (constraints/oldest.txt: transformers,
# tokenizers, huggingface_hub, datasets, hydra-core, omegaconf, lm-eval) in a virtual environment of
# their own, then `pip check` and the unit tests plus the export and architecture-matrix integration
# tests. torch stays at 2.13.0, the one CPU build this project's machines carry.
#
#   bash scripts/test_oldest.sh [pytest args...]
#
# NEMODIFF_OLDEST_VENV (default /tmp/nemodiff-oldest-venv) is reused when it exists (delete it to start
# over); NEMODIFF_OLDEST_PYTHON picks the interpreter (default: python3, a supported one). CI runs this
# from .ci/run; it takes a few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${NEMODIFF_OLDEST_VENV:-/tmp/nemodiff-oldest-venv}
[[ -x $venv/bin/python ]] || "${NEMODIFF_OLDEST_PYTHON:-python3}" -m venv "$venv"
py=$venv/bin/python

$py -m pip install -q -c constraints/oldest.txt "torch==2.13.0" -e ".[test]"
$py -m pip check
# the constraints pin, so a resolver that silently moved a version would be a bug here: say what ran
$py - <<'PY'
import importlib.metadata as md, re, sys
pins = dict(re.match(r"([\w.-]+)==(\S+)", line).groups() for line in open("constraints/oldest.txt")
            if line.strip() and not line.startswith("#"))
wrong = {n: md.version(n) for n, v in pins.items() if md.version(n) != v}
print("oldest versions:", ", ".join(f"{n} {md.version(n)}" for n in pins))
sys.exit(f"not the oldest versions: {wrong}" if wrong else 0)
PY
$py -m pytest -q -p no:cacheprovider -m "not slow" tests/unit \
    tests/integration/test_arch_matrix.py tests/integration/test_export_cli.py \
    tests/integration/test_export_stop_tokens.py tests/integration/test_export_trust_remote_code.py "$@"

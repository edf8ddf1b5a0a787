#!/usr/bin/env bash
# Installs the package with its test extra (CPU torch pinned) and runs the default test tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e ".[test]"
python -m pytest -q -p no:cacheprovider "$@"

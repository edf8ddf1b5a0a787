#!/usr/bin/env bash
# The README's test command: installs the package with its test extra (CPU torch pinned), sets up what
# it can of the optional tiers, runs pytest ("$@" passes through) and says which tiers ran.
#
#   megatron  scripts/install_megatron_cpu.sh (pip; always tried)               -> tests/megatron
#   slurm     .ci/setup_slurm.sh (as root, or with passwordless sudo; apt-get)  -> the `slurm` tests
#   gpu       needs CUDA                                                        -> tests/gpu
#
# A tier that cannot be set up is skipped, and the summary at the end says why. CI (.ci/run) requires
# the megatron and slurm tiers instead. NEMODIFF_TEST_SETUP=0 skips every install and set-up step
# (the package and the tiers are already installed, e.g. by .ci/run) and only runs and reports.
set -uo pipefail
cd "$(dirname "$0")/.."

declare -A why=()
if [[ ${NEMODIFF_TEST_SETUP:-1} != 0 ]]; then
    python -m pip install -q "torch==2.13.0" -e ".[test]" || { echo "scripts/test.sh: pip install failed" >&2; exit 1; }
    if ! bash scripts/install_megatron_cpu.sh >/tmp/nemodiff-megatron-install.log 2>&1; then
        why[megatron]="scripts/install_megatron_cpu.sh failed (log: /tmp/nemodiff-megatron-install.log)"
    fi
    if [[ $(id -u) == 0 ]]; then
        bash .ci/setup_slurm.sh || why[slurm]=".ci/setup_slurm.sh failed (its log is above)"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n bash .ci/setup_slurm.sh || why[slurm]="sudo .ci/setup_slurm.sh failed (its log is above)"
    else
        why[slurm]="a local Slurm needs root or passwordless sudo to set up (.ci/setup_slurm.sh)"
    fi
fi
# what is usable now, whoever set it up
if [[ -z ${why[megatron]:-} ]] && ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('megatron.bridge') is None)" 2>/dev/null; then
    why[megatron]="megatron-bridge is not installed (scripts/install_megatron_cpu.sh)"
fi
if [[ -z ${why[slurm]:-} ]] && ! { command -v sinfo >/dev/null 2>&1 && sinfo -h >/dev/null 2>&1; }; then
    why[slurm]="no Slurm controller answers (sinfo)"
fi
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    why[gpu]="no CUDA device"
fi

python -m pytest -q -p no:cacheprovider "$@"
rc=$?

echo
echo "== test tiers =="
echo "  unit + integration: ran"
for tier in megatron slurm gpu; do
    if [[ -n ${why[$tier]:-} ]]; then
        echo "  $tier: SKIPPED - ${why[$tier]}"
    else
        echo "  $tier: ran"
    fi
done
echo "pytest exit status: $rc"
exit $rc

#!/usr/bin/env bash
# The README's test command: installs the package with its test extra (CPU torch pinned), sets up what
# it can of the optional tiers, runs pytest and says which selection and which tiers ran.
#
#   bash scripts/test.sh [--all] [pytest args...]
#
# Selection:
#   default   pytest -m "not slow": every tier's fast tests plus one real end-to-end test of each
#             capability (train, torchrun, kill + resume, export + load, evaluate, Megatron); the
#             README says how long it takes
#   --all     everything, the `slow` tests and the slurm tier included (what CI, .ci/run, runs);
#             NEMODIFF_TEST_ALL=1 does the same
# Other arguments go to pytest; a -m of your own replaces the default selection's.
#
# Tiers:
#   megatron  scripts/install_megatron_cpu.sh (pip, into its own venv under       -> tests/megatron,
#             megatron-bridge's pins; always tried)                                  run by that venv's python
#   slurm     .ci/setup_slurm.sh (as root, or with passwordless sudo; apt-get)   -> the `slurm` tests
#             (all slow: set up with --all only)
#   gpu       needs CUDA                                                         -> tests/gpu
#
# A tier that cannot be set up is skipped, and the summary at the end says why. CI (.ci/run) requires
# the megatron and slurm tiers instead. NEMODIFF_TEST_SETUP=0 skips every install and set-up step
# (the package and the tiers are already installed, e.g. by .ci/run) and only runs and reports.
set -uo pipefail
cd "$(dirname "$0")/.."

all=${NEMODIFF_TEST_ALL:-0}
args=()
own_m=0
for a in "$@"; do
    case $a in
        --all) all=1 ;;
        -m | -m*) own_m=1; args+=("$a") ;;
        *) args+=("$a") ;;
    esac
done
if [[ $own_m == 1 ]]; then
    selection="your -m (replaces the default selection)"
    select=()
elif [[ $all == 1 ]]; then
    selection="all (slow tests included)"
    select=()
else
    selection="default (-m \"not slow\"; scripts/test.sh --all adds the slow tests and the slurm tier)"
    select=(-m "not slow")
fi

declare -A why=()
if [[ $all != 1 ]]; then
    why[slurm]="not set up without --all (every slurm test is slow)"
fi
if [[ ${NEMODIFF_TEST_SETUP:-1} != 0 ]]; then
    python -m pip install -q "torch==2.13.0" -e ".[test]" || { echo "scripts/test.sh: pip install failed" >&2; exit 1; }
    if ! bash scripts/install_megatron_cpu.sh >/tmp/nemodiff-megatron-install.log 2>&1; then
        why[megatron]="scripts/install_megatron_cpu.sh failed (log: /tmp/nemodiff-megatron-install.log)"
    fi
    if [[ -n ${why[slurm]:-} ]]; then
        :  # the default selection runs no slurm test: no apt-get, no daemons
    elif [[ $(id -u) == 0 ]]; then
        bash .ci/setup_slurm.sh || why[slurm]=".ci/setup_slurm.sh failed (its log is above)"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n bash .ci/setup_slurm.sh || why[slurm]="sudo .ci/setup_slurm.sh failed (its log is above)"
    else
        why[slurm]="a local Slurm needs root or passwordless sudo to set up (.ci/setup_slurm.sh)"
    fi
fi
# what is usable now, whoever set it up. The Megatron tier has its own environment (megatron-bridge's
# pins); tests/megatron runs there, everything else here. A Megatron install in this environment
# (the old way) is still used when there is no tier venv.
megatron_py=${NEMODIFF_MEGATRON_VENV:-/tmp/nemodiff-megatron-venv}/bin/python
has_bridge="import importlib.util as u, sys; sys.exit(u.find_spec('megatron.bridge') is None)"
if [[ -x $megatron_py ]] && "$megatron_py" -c "$has_bridge" 2>/dev/null; then
    :
elif python -c "$has_bridge" 2>/dev/null; then
    megatron_py=python
else
    megatron_py=
    [[ -n ${why[megatron]:-} ]] || why[megatron]="megatron-bridge is not installed (scripts/install_megatron_cpu.sh)"
fi
# explicit test paths among the arguments (tests/x.py, tests/x.py::test_y): one pytest run, with this
# python, on exactly those
split_megatron=1
for a in "${args[@]}"; do [[ $a != -* && -e ${a%%::*} ]] && split_megatron=0; done
if [[ -z ${why[slurm]:-} ]] && ! { command -v sinfo >/dev/null 2>&1 && sinfo -h >/dev/null 2>&1; }; then
    why[slurm]="no Slurm controller answers (sinfo)"
fi
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    why[gpu]="no CUDA device"
fi

# Workers: most tests spend their time in one-thread subprocesses (a CLI, torchrun), so one pytest
# process leaves a core idle; two pytest-xdist workers (tests/conftest.py keeps a module on one worker)
# use both. NEMODIFF_TEST_WORKERS=1 runs serially; explicit test paths run serially too.
workers=${NEMODIFF_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
xdist=()
if [[ $split_megatron == 1 && $workers -gt 1 ]] && python -c "import xdist" 2>/dev/null; then
    xdist=(-n "$workers" --dist loadgroup)
    echo "== $workers pytest-xdist workers (NEMODIFF_TEST_WORKERS=1: one process) =="
fi

start=$(date +%s)
if [[ $split_megatron == 1 && -n $megatron_py && $megatron_py != python ]]; then
    python -m pytest -q -p no:cacheprovider --durations=15 "${xdist[@]}" --ignore=tests/megatron "${select[@]}" "${args[@]}"
    rc=$?
    echo "== tests/megatron with $megatron_py (megatron-bridge's pins) =="
    "$megatron_py" -m pytest -q -p no:cacheprovider --durations=15 "${select[@]}" "${args[@]}" tests/megatron
    mrc=$?
    (( rc != 0 )) || rc=$mrc
else
    python -m pytest -q -p no:cacheprovider --durations=15 "${xdist[@]}" "${select[@]}" "${args[@]}"
    rc=$?
fi

echo
echo "== test tiers =="
echo "  selection: $selection"
echo "  unit + integration + faults: ran"
for tier in megatron slurm gpu; do
    if [[ $tier == slurm && $all != 1 && $own_m != 1 ]]; then
        echo "  slurm: not selected (slow; scripts/test.sh --all runs it)"
    elif [[ -n ${why[$tier]:-} ]]; then
        echo "  $tier: SKIPPED - ${why[$tier]}"
    else
        echo "  $tier: ran"
    fi
done
echo "  pytest wall time: $(($(date +%s) - start)) s (the 15 slowest tests of each pytest run are listed above)"
echo "  scripts/test.sh wall time, set-up included: $SECONDS s"
echo "pytest exit status: $rc"
exit $rc

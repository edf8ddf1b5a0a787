#!/usr/bin/env bash
#SBATCH --job-name=tiny_cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#
# Tiny CPU pretraining (recipe `tiny_cpu`): 1 node, no GPUs, NPROC_PER_NODE=2 processes under
# torchrun -- the same slurm/_launch.sh path as the GPU scripts, so tests exercise it.
#
#   sbatch slurm/pretrain_tiny.sh [hydra overrides...]     e.g. sbatch slurm/pretrain_tiny.sh stages.0.steps=20
#   NEMODIFF_DRY_RUN=1 bash slurm/pretrain_tiny.sh ...     print the resolved command only
#
# Chain jobs (each resumes from the latest checkpoint in the shared RUN_DIR):
#   jid=$(sbatch --parsable slurm/pretrain_tiny.sh)
#   sbatch --dependency=afterany:$jid --export=ALL,CHAIN_ID=$jid slurm/pretrain_tiny.sh
# 60 s before the time limit the batch shell gets USR1 and forwards it: the trainer saves a
# checkpoint and exits 0. Environment knobs and the signal story: slurm/_launch.sh.
set -euo pipefail

export RECIPE=tiny_cpu
export GPUS_PER_NODE=0
export NPROC_PER_NODE=${NPROC_PER_NODE:-2}

# sbatch runs a COPY of this script from its spool dir: find _launch.sh via NEMODIFF_SLURM_DIR,
# next to this file, the submitted script's path (scontrol), or <submit dir>/slurm.
_nd_dir=${NEMODIFF_SLURM_DIR:-$(dirname "${BASH_SOURCE[0]}")}
if [[ ! -f $_nd_dir/_launch.sh && -n ${SLURM_JOB_ID:-} ]]; then
    _nd_dir=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -oE 'Command=[^ ]+' |
        sed 's/^Command=//; s#/[^/]*$##' || true)
    [[ -f $_nd_dir/_launch.sh ]] || _nd_dir=${SLURM_SUBMIT_DIR:-$PWD}/slurm
fi
[[ -f $_nd_dir/_launch.sh ]] || { echo "cannot find slurm/_launch.sh: set NEMODIFF_SLURM_DIR" >&2; exit 1; }
# shellcheck source=slurm/_launch.sh
source "$_nd_dir/_launch.sh"

nd_launch_train "$@"

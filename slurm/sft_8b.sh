#!/usr/bin/env bash
#SBATCH --job-name=nld_8b_sft
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#
# 8B SFT: recipe `nld_8b_sft`, 8 nodes x 8 GPUs (the recipe's hardware and memory estimate), engine=megatron (the recipe's; its tensor parallelism has no torch-engine equivalent).
#
#   sbatch slurm/sft_8b.sh [hydra overrides...]          e.g.  sbatch slurm/sft_8b.sh diffusion.block_size=32
#   NEMODIFF_DRY_RUN=1 bash slurm/sft_8b.sh ...          print the resolved command only
#
# Chain jobs (each resumes from the latest checkpoint in the shared RUN_DIR):
#   jid=$(sbatch --parsable slurm/sft_8b.sh)
#   sbatch --dependency=afterany:$jid --export=ALL,CHAIN_ID=$jid slurm/sft_8b.sh
# (or give every job the same RUN_DIR=...; AUTO_REQUEUE=1 requeues the job itself instead).
# 300 s before the time limit the batch shell gets USR1 and forwards it: the trainer saves a
# checkpoint and exits 0. Environment knobs and the signal story: slurm/_launch.sh.
set -euo pipefail

export RECIPE=nld_8b_sft
export ENGINE=${ENGINE-megatron}

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

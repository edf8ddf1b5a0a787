#!/usr/bin/env bash
#SBATCH --job-name=nld_8b_longctx
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
# 8B long-context conversion: recipe `nld_8b_longctx` (L = 32,768, context parallelism cp = 8, TP4), 8 nodes x 8 GPUs (the recipe's hardware and memory estimate), engine=megatron (the recipe's; context and tensor parallelism are Megatron-engine settings here).
#
#   sbatch slurm/pretrain_8b_longctx.sh [hydra overrides...]          e.g.  sbatch slurm/pretrain_8b_longctx.sh engine.recompute=full
#   NEMODIFF_DRY_RUN=1 bash slurm/pretrain_8b_longctx.sh ...          print the resolved command only
#
# Chain jobs (each resumes from the latest checkpoint in the shared RUN_DIR):
#   jid=$(sbatch --parsable slurm/pretrain_8b_longctx.sh)
#   sbatch --dependency=afterany:$jid --export=ALL,CHAIN_ID=$jid slurm/pretrain_8b_longctx.sh
# (or give every job the same RUN_DIR=...; AUTO_REQUEUE=1 requeues the job itself instead).
# 300 s before the time limit the batch shell gets USR1 and forwards it: the trainer saves a
# checkpoint and exits 0. Environment knobs and the signal story: slurm/_launch.sh.
set -euo pipefail

export RECIPE=nld_8b_longctx
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

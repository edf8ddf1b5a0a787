#!/usr/bin/env bash
#SBATCH --job-name=nld_eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#
# Evaluate a model on one node:  python -m nemodiff_train.cli.evaluate model=$MODEL out=$OUT "$@"
#
#   MODEL=runs/nld_8b_pretrain-1234/hf sbatch slurm/eval.sh [evaluate overrides...]
#   MODEL=... OUT=... NEMODIFF_DRY_RUN=1 bash slurm/eval.sh ...   print the resolved command only
#
# MODEL is required; OUT defaults to ${RUNS_ROOT:-$PWD/runs}/eval-<job id>. Fewer GPUs:
# sbatch --gpus-per-node=1 --no-exclusive ... (command-line options override these headers).
set -euo pipefail

: "${MODEL:?set MODEL=<model or checkpoint path> (e.g. MODEL=... sbatch slurm/eval.sh)}"
OUT=${OUT:-${RUNS_ROOT:-$PWD/runs}/eval-${SLURM_JOB_ID:-0}}

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

nd_log "job ${SLURM_JOB_ID:-<none>}: evaluating $MODEL -> $OUT"
[[ ${NEMODIFF_DRY_RUN:-0} == 1 || -z ${SLURM_JOB_ID:-} ]] || mkdir -p "$OUT"
nd_run_step srun --nodes=1 --ntasks=1 \
    "${PYTHON:-python}" -m "${NEMODIFF_EVAL_MODULE:-nemodiff_train.cli.evaluate}" \
    "model=$MODEL" "out=$OUT" "$@"

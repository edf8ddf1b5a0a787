# shellcheck shell=bash
# Shared launch logic for the slurm/*.sh batch scripts. Sourced, never run directly:
#
#     RECIPE=nld_8b_pretrain ENGINE=megatron; source "$dir/_launch.sh"; nd_launch_train "$@"
#
# nd_launch_train runs ONE srun task per node; each task runs torchrun, which starts
# NPROC_PER_NODE trainer processes:
#
#   srun --nodes=$NNODES --ntasks=$NNODES --ntasks-per-node=1 --kill-on-bad-exit=1 \
#     bash -c 'trap "" TERM USR1 USR2; exec "$@"' nemodiff-step \
#     torchrun --nnodes=$NNODES --nproc-per-node=$NPROC_PER_NODE --rdzv-backend=c10d \
#       --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$SLURM_JOB_ID \
#       --signals-to-handle=SIGINT,SIGHUP,SIGQUIT \
#       -m nemodiff_train.cli.train recipe=$RECIPE run.dir=$RUN_DIR [engine=$ENGINE] "$@"
#
# Environment (all optional except RECIPE, which the calling script sets):
#   RUN_DIR         the run directory; default ${RUNS_ROOT:-$PWD/runs}/${SLURM_JOB_NAME}-${CHAIN_ID}
#   CHAIN_ID        names the run directory of a CHAIN of jobs; default: this job's id. Jobs that
#                   continue a run must get the same RUN_DIR or CHAIN_ID (the trainer resumes from
#                   the latest checkpoint in $RUN_DIR/checkpoints/):
#                     jid=$(sbatch --parsable slurm/pretrain_8b.sh)
#                     sbatch --dependency=afterany:$jid --export=ALL,CHAIN_ID=$jid slurm/pretrain_8b.sh
#                   A job requeued by Slurm (--requeue, preemption, AUTO_REQUEUE) keeps its job id
#                   and so its RUN_DIR.
#   RUNS_ROOT       parent of the default RUN_DIR (default $PWD/runs; $PWD = sbatch's --chdir)
#   ENGINE          non-empty: `engine=$ENGINE` is appended (same torchrun launch). Every NLD recipe's
#                   engine is megatron (the 8B/14B scripts also set ENGINE=megatron); ENGINE=torch runs
#                   the torch engine (data-parallel only: the 3B recipes, e.g.
#                   `ENGINE=torch sbatch slurm/sft_3b.sh engine.distributed=fsdp2`).
#   GPUS_PER_NODE   default $SLURM_GPUS_ON_NODE, else 8
#   NPROC_PER_NODE  processes per node (default GPUS_PER_NODE; CPU recipes set it)
#   NNODES          default $SLURM_NNODES
#   MASTER_ADDR     default: first host of $SLURM_JOB_NODELIST
#   MASTER_PORT     default 20000 + SLURM_JOB_ID % 20000
#   SRUN_EXTRA_ARGS / TORCHRUN_EXTRA_ARGS  extra words (site options: --mpi=..., --container-image=...)
#   TORCHRUN        launcher command (default `torchrun`, else `$PYTHON -m torch.distributed.run`)
#   PYTHON          default python
#   NEMODIFF_TRAIN_MODULE  module run by torchrun (default nemodiff_train.cli.train; tests swap it)
#   AUTO_REQUEUE=1  after a pre-timeout USR1 and a clean exit, `scontrol requeue` this job (same
#                   job id => same RUN_DIR, resumes; Slurm makes a requeued job eligible again
#                   only ~2 min later; --open-mode=append keeps the earlier runs' log). An
#                   alternative to chaining with --dependency.
#   NEMODIFF_DRY_RUN=1  only print the resolved command and exit 0 (tests; works without Slurm).
#
# ---------------------------------------------------------------------------------------------
# Signals: how they reach the trainer (measured on Slurm 22.05 with tests/integration/
# test_slurm_infra.py; see the comment there for the full table)
# ---------------------------------------------------------------------------------------------
#   * `#SBATCH --signal=B:USR1@300` sends USR1 to the batch SHELL only, 300 s before the time
#     limit. The shell runs srun in the background and `wait`s (a shell cannot run a trap while
#     a foreground child runs), so its trap runs at once and forwards USR1 to srun. srun forwards
#     USR1 to EVERY process of the step (torchrun and each trainer process, not just the task).
#   * The shell never forwards TERM to srun: srun turns SIGTERM/SIGHUP/SIGQUIT into "forcing job
#     termination" = SIGKILL of the step. A TERM/INT/USR2 reaching the shell is forwarded as USR1
#     (the trainer treats USR1 and TERM alike: checkpoint, exit 0).
#   * On `scancel <job>`, on the time limit and on preemption, slurmd itself sends SIGTERM to
#     every process of every step (and to the batch shell), then SIGKILL after KillWait; the
#     shell keeps waiting for srun so the step can finish its checkpoint within KillWait.
#   * `scancel --signal=TERM <job>` (no -b/--full) signals every process of the srun steps, not
#     the batch shell or processes it started directly: fine for the trainer under srun.
#     `scancel --signal=USR1 -b <job>` behaves like the pre-timeout signal.
#     Do NOT use `scancel --full --signal=TERM`: srun itself gets TERM and SIGKILLs the step.
#   * torchrun must not act on TERM/USR1: by default it turns TERM into SignalException, forwards
#     it, waits only --shutdown-timeout (30 s) and then exits 1 even when every worker saved and
#     exited 0 — with --kill-on-bad-exit the first torchrun exiting 1 would SIGKILL the other
#     nodes' ranks while they may still be writing the checkpoint, and an unhandled USR1 would
#     kill torchrun outright. So the step starts torchrun with TERM/USR1/USR2 ignored (inherited
#     SIG_IGN; torchrun only handles --signals-to-handle=SIGINT,SIGHUP,SIGQUIT). The trainer
#     processes get the signal directly from Slurm (they install their own handlers, which replace
#     the inherited SIG_IGN), exit 0, torchrun exits 0, srun exits 0: the job ends COMPLETED (or
#     CANCELLED after scancel). A worker can receive the same request more than once (e.g. TERM
#     from slurmd plus the forwarded USR1): the trainer's handler must be idempotent. Caveats of
#     the inherited SIG_IGN: a signal arriving before the trainer installed its handlers is
#     ignored (install them first thing; the shell repeats the forwarded USR1 every ND_RESIGNAL_S
#     seconds, default 10, until the step exits, so an early request is not lost), and
#     subprocesses that install no handler ignore TERM until the SIGKILL after KillWait.
#   * --kill-on-bad-exit=1: a node whose torchrun exits non-zero (a real failure) ends the step
#     at once instead of leaving the other nodes hanging in a collective until a NCCL timeout.

# Print a command as one shell-quoted line.
nd_quote() {
    local out="" w re='^[A-Za-z0-9_@%+=:,./-]+$'
    for w in "$@"; do
        if [[ $w =~ $re ]]; then
            out+="$w "
        else
            out+="'${w//\'/\'\\\'\'}' "
        fi
    done
    printf '%s' "${out% }"
}

nd_log() { printf '[nemodiff-launch] %s\n' "$*"; }

# First host of a Slurm node list. Uses `scontrol show hostnames` when available, else parses
# the simple forms "host", "host1,host2", "pre[01-04,07],other".
nd_first_host() {
    local nodelist=$1 first=""
    if command -v scontrol >/dev/null 2>&1; then
        first=$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n1 || true)
    fi
    if [[ -z $first ]]; then
        local re='^([^],[]*)\[([^],[-]+)'
        if [[ $nodelist =~ $re ]]; then
            first="${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
        else
            first=${nodelist%%,*}
        fi
    fi
    printf '%s\n' "$first"
}

# Run "$@" as a Slurm step in the background, forward signals, wait, return its exit code.
# With NEMODIFF_DRY_RUN=1 only print it.
_ND_STEP_PID=""
_ND_SIGNALLED=""
_ND_RESENDER_PID=""
_nd_on_signal() {
    local sig=$1
    nd_log "batch shell got SIG$sig at $(date '+%F %T')"
    # Always forward USR1, once: srun turns a forwarded TERM/HUP/QUIT into SIGKILL of the step.
    # (On job cancel / time limit slurmd also sends TERM to the step's processes itself.)
    if [[ -z $_ND_SIGNALLED && -n $_ND_STEP_PID ]] && kill -0 "$_ND_STEP_PID" 2>/dev/null; then
        nd_log "forwarding SIGUSR1 to srun (pid $_ND_STEP_PID): trainer checkpoints and exits"
        kill -USR1 "$_ND_STEP_PID" 2>/dev/null || true
        # A trainer still starting up ignores USR1 (SIG_IGN inherited from the step until it installs
        # its handler), so a request that arrives then would be lost and the job would run into its
        # time limit. Repeat it until the step exits: the trainer's handler is idempotent.
        ( while sleep "${ND_RESIGNAL_S:-10}" && kill -0 "$_ND_STEP_PID" 2>/dev/null; do
              kill -USR1 "$_ND_STEP_PID" 2>/dev/null || true
          done ) &
        _ND_RESENDER_PID=$!
    fi
    _ND_SIGNALLED=${_ND_SIGNALLED:-$sig}
}

nd_run_step() {
    nd_log "command: $(nd_quote "$@")"
    if [[ ${NEMODIFF_DRY_RUN:-0} == 1 ]]; then
        nd_log "NEMODIFF_DRY_RUN=1: not running"
        return 0
    fi
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        nd_log "ERROR: not inside a Slurm job; submit with sbatch (or set NEMODIFF_DRY_RUN=1)" >&2
        return 2
    fi
    local sig
    for sig in USR1 USR2 TERM INT; do
        # shellcheck disable=SC2064
        trap "_nd_on_signal $sig" "$sig"
    done
    "$@" &
    _ND_STEP_PID=$!
    nd_log "step started (srun pid $_ND_STEP_PID); USR1/USR2/TERM/INT now reach the trainer as USR1"
    local rc=0
    # `wait` returns >128 when a trapped signal interrupts it: keep waiting while srun lives.
    while :; do
        rc=0
        wait "$_ND_STEP_PID" || rc=$?
        kill -0 "$_ND_STEP_PID" 2>/dev/null || break
    done
    trap - USR1 USR2 TERM INT
    if [[ -n $_ND_RESENDER_PID ]]; then kill "$_ND_RESENDER_PID" 2>/dev/null || true; fi
    nd_log "step exited with code $rc${_ND_SIGNALLED:+ (after SIG$_ND_SIGNALLED)}"
    return "$rc"
}

# Resolve the distributed setup and launch the trainer. "$@": Hydra overrides passed through.
nd_launch_train() {
    : "${RECIPE:?RECIPE must be set by the calling script}"
    if [[ ${NEMODIFF_DRY_RUN:-0} != 1 && -z ${SLURM_JOB_ID:-} ]]; then
        nd_log "ERROR: not inside a Slurm job; submit with sbatch (or set NEMODIFF_DRY_RUN=1)" >&2
        return 2
    fi
    local job_id=${SLURM_JOB_ID:-0}
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-$(hostname -s)}}
    NNODES=${NNODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}}
    MASTER_ADDR=${MASTER_ADDR:-$(nd_first_host "$nodelist")}
    MASTER_PORT=${MASTER_PORT:-$((20000 + job_id % 20000))}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS_PER_NODE}
    CHAIN_ID=${CHAIN_ID:-$job_id}
    local job_name=${SLURM_JOB_NAME:-$RECIPE}
    RUN_DIR=${RUN_DIR:-${RUNS_ROOT:-$PWD/runs}/${job_name}-${CHAIN_ID}}
    export MASTER_ADDR MASTER_PORT NNODES GPUS_PER_NODE NPROC_PER_NODE CHAIN_ID RUN_DIR

    local -a torchrun_cmd srun_extra=() torchrun_extra=() train_args
    if [[ -n ${TORCHRUN:-} ]]; then
        read -ra torchrun_cmd <<<"$TORCHRUN"
    elif command -v torchrun >/dev/null 2>&1; then
        torchrun_cmd=(torchrun)
    else
        torchrun_cmd=("${PYTHON:-python}" -m torch.distributed.run)
    fi
    [[ -n ${SRUN_EXTRA_ARGS:-} ]] && read -ra srun_extra <<<"$SRUN_EXTRA_ARGS"
    [[ -n ${TORCHRUN_EXTRA_ARGS:-} ]] && read -ra torchrun_extra <<<"$TORCHRUN_EXTRA_ARGS"

    train_args=("recipe=$RECIPE" "run.dir=$RUN_DIR")
    [[ -n ${ENGINE:-} ]] && train_args+=("engine=$ENGINE")
    train_args+=("$@")

    nd_log "job ${SLURM_JOB_ID:-<none>} ($job_name): $NNODES node(s) [$nodelist] x $NPROC_PER_NODE proc(s)," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT"
    nd_log "RUN_DIR=$RUN_DIR (CHAIN_ID=$CHAIN_ID${ENGINE:+, ENGINE=$ENGINE})"
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        nd_log "continue this run with: sbatch --dependency=afterany:$SLURM_JOB_ID" \
            "--export=ALL,CHAIN_ID=$CHAIN_ID <this script> [same overrides]"
    fi
    if [[ ${NEMODIFF_DRY_RUN:-0} != 1 ]]; then
        mkdir -p "$RUN_DIR"
    fi

    local rc=0
    nd_run_step srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        "${srun_extra[@]}" \
        bash -c 'trap "" TERM USR1 USR2; exec "$@"' nemodiff-step \
        "${torchrun_cmd[@]}" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
        --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$job_id" \
        --signals-to-handle=SIGINT,SIGHUP,SIGQUIT "${torchrun_extra[@]}" \
        -m "${NEMODIFF_TRAIN_MODULE:-nemodiff_train.cli.train}" "${train_args[@]}" || rc=$?

    if [[ ${AUTO_REQUEUE:-0} == 1 && $rc -eq 0 && $_ND_SIGNALLED == USR1 && -n ${SLURM_JOB_ID:-} ]]; then
        nd_log "AUTO_REQUEUE=1: requeueing job $SLURM_JOB_ID (resumes from $RUN_DIR/checkpoints)"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}

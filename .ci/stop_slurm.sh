#!/usr/bin/env bash
# Stop the single-node CI Slurm cluster started by .ci/setup_slurm.sh.
#
#   .ci/stop_slurm.sh            cancel all jobs, stop slurmd + slurmctld (and munged if
#                                setup_slurm.sh started it)
#   .ci/stop_slurm.sh --purge    also delete $SLURM_CI_DIR (state, spool, logs)
#
# Only the processes named in the pid files of $SLURM_CI_DIR (and munged's own pid file) are
# signalled. SLURM_CI_KEEP_MUNGE=1 leaves munged running.
set -euo pipefail

SLURM_CI_DIR=${SLURM_CI_DIR:-/var/tmp/nemodiff-slurm}
purge=0
for arg in "$@"; do
    case $arg in
    --purge) purge=1 ;;
    -h | --help)
        sed -n '2,10p' "$0"
        exit 0
        ;;
    *)
        echo "unknown argument: $arg" >&2
        exit 2
        ;;
    esac
done

log() { printf '[stop_slurm] %s\n' "$*"; }

stop_pidfile() { # name pidfile
    local name=$1 pidfile=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 75); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) still alive after 15s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

# Cancel the jobs of this (private, CI-only) cluster so that no slurmstepd outlives slurmd.
if [[ -f $SLURM_CI_DIR/run/slurmctld.pid ]] && command -v squeue >/dev/null 2>&1 &&
    timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    jobs=$(timeout 10 squeue -h -t PD,R,CG,S,CF -o '%A' 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 40); do
            [[ -z $(timeout 10 squeue -h -o '%A' 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
fi

stop_pidfile slurmd "$SLURM_CI_DIR/run/slurmd.pid"
stop_pidfile slurmctld "$SLURM_CI_DIR/run/slurmctld.pid"

if [[ ${SLURM_CI_KEEP_MUNGE:-0} != 1 && -f $SLURM_CI_DIR/run/munged.started-by-setup ]]; then
    stop_pidfile munged /run/munge/munged.pid
    rm -f "$SLURM_CI_DIR/run/munged.started-by-setup"
fi

if [[ $purge -eq 1 ]]; then
    log "removing $SLURM_CI_DIR"
    rm -rf "$SLURM_CI_DIR"
fi
log "done"

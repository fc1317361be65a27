# shellcheck shell=bash
# Shared by the stand-in scheduler commands (sourced): log the call, find the real mpiexec.
# MEDHPC_STANDIN_LOG: a file that gets one line per call ("name arg arg ...").
# MEDHPC_STANDIN_MPIEXEC: the real mpiexec (the venv's MPICH Hydra) that launches the ranks.

standin_log() {
    if [ -n "${MEDHPC_STANDIN_LOG:-}" ]; then
        printf '%s\n' "$*" >> "$MEDHPC_STANDIN_LOG"
    fi
}

standin_fail() {
    echo "stand-in $(basename "$0"): $*" >&2
    exit 97
}

standin_launch() {
    # standin_launch RANKS COMMAND...: start RANKS copies of COMMAND under the real mpiexec.
    local ranks=$1
    shift
    [ "$#" -gt 0 ] || standin_fail "no command to launch"
    [ -n "${MEDHPC_STANDIN_MPIEXEC:-}" ] || standin_fail "MEDHPC_STANDIN_MPIEXEC is not set"
    # All ranks on this host, whatever node list the scheduler variables name.
    exec "$MEDHPC_STANDIN_MPIEXEC" -launcher fork -hosts localhost -n "$ranks" "$@"
}

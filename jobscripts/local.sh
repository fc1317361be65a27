#!/bin/bash
# medhpc on a workstation: N ranks under the mpiexec on PATH (the MPI wheel's mpiexec in a
# virtual environment made with `pip install 'medhpc[mpich]'`), GPUs shared out by rank.
#
# Run:     jobscripts/local.sh SUBCOMMAND [ARGS...]
#   e.g.   MEDHPC_RANKS=4 jobscripts/local.sh pet-recon --sinogram sino.h5 --out recon.nii.gz
# Edit:    nothing needed; MEDHPC_RANKS (default 2), MEDHPC_THREADS (default: cores / ranks),
#          MEDHPC_VENV, MEDHPC_CONTAINER (an image: run medhpc inside it), MPIEXEC_TIMEOUT
#          (seconds after which MPICH's mpiexec ends a hung job).
# Exit 143: a checkpoint was saved on SIGTERM/SIGUSR1: rerun with --resume appended.
set -euo pipefail

job_id="local-$$"
workdir="$PWD"
node_tmp="${TMPDIR:-/tmp}"
submit="jobscripts/local.sh"
cores=$(nproc 2> /dev/null || echo 1)
ranks="${MEDHPC_RANKS:-2}"
MEDHPC_THREADS="${MEDHPC_THREADS:-$(( cores / ranks > 0 ? cores / ranks : 1 ))}"

# ---- site: edit for your machine ----
MEDHPC_VENV="${MEDHPC_VENV:-}"      # a virtual environment holding medhpc; activated when set
MEDHPC_LAUNCH="${MEDHPC_LAUNCH:-mpiexec -n $ranks}"
MEDHPC_BIN="${MEDHPC_BIN:-medhpc}"
MEDHPC_CONTAINER="${MEDHPC_CONTAINER:-}"              # an image (.sif): run medhpc inside it
MEDHPC_CONTAINER_RUNTIME="${MEDHPC_CONTAINER_RUNTIME:-apptainer}"
# ---- end site ----

gpu_flags=()
if command -v nvidia-smi > /dev/null 2>&1; then
    gpu_flags=(--nv)
fi
env_flag=""

# ---- common: identical in every medhpc job script (tests/jobscripts checks this) ----
# Needs: job_id, workdir, node_tmp, submit, gpu_flags (array), env_flag, MEDHPC_LAUNCH,
# MEDHPC_BIN, MEDHPC_CONTAINER, MEDHPC_CONTAINER_RUNTIME, MEDHPC_THREADS.
if [ "$#" -eq 0 ] && [ -n "${MEDHPC_ARGS:-}" ]; then
    read -r -a job_args <<< "$MEDHPC_ARGS"
    set -- "${job_args[@]}"
fi
if [ "$#" -eq 0 ]; then
    echo "medhpc job: no subcommand; usage: $submit SUBCOMMAND [ARGS...] (or set MEDHPC_ARGS)" >&2
    exit 2
fi
cd "$workdir"
if [ -n "${MEDHPC_VENV:-}" ]; then
    # shellcheck source=/dev/null
    source "$MEDHPC_VENV/bin/activate"
fi
# Threads per rank, a node-local JIT cache, caches that never need $HOME, no HDF5 locks.
export MEDHPC_THREADS
export OMP_NUM_THREADS="$MEDHPC_THREADS"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$node_tmp/medhpc-numba-$job_id}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$node_tmp/medhpc-matplotlib-$job_id}"
export HDF5_USE_FILE_LOCKING=FALSE
medhpc_command=("$MEDHPC_BIN")
if [ -n "$MEDHPC_CONTAINER" ]; then
    if [ ! -f "$MEDHPC_CONTAINER" ]; then
        echo "medhpc job: container image $MEDHPC_CONTAINER not found (build it: containers/README.md)" >&2
        exit 2
    fi
    # Hybrid MPI model: the host launcher starts one container per rank.
    export PYTHONNOUSERSITE=1
    export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$node_tmp/medhpc-cache-$job_id}"
    binds="$workdir,$node_tmp${MEDHPC_CONTAINER_BIND:+,$MEDHPC_CONTAINER_BIND}"
    medhpc_command=("$MEDHPC_CONTAINER_RUNTIME" exec ${gpu_flags[@]+"${gpu_flags[@]}"} --bind "$binds"
                    "$MEDHPC_CONTAINER" medhpc)
fi
read -r -a launcher <<< "$MEDHPC_LAUNCH"
if [ -n "$env_flag" ]; then
    # Launchers that do not forward the environment to other nodes (Open MPI: -x NAME).
    for name in $(compgen -e); do
        case "$name" in
            MEDHPC_*|OMP_NUM_THREADS|NUMBA_*|MPLCONFIGDIR|HDF5_USE_FILE_LOCKING|PYTHONNOUSERSITE|XDG_CACHE_HOME)
                launcher+=("$env_flag" "$name") ;;
        esac
    done
fi
echo "medhpc job $job_id on $(hostname) at $(date '+%Y-%m-%d %H:%M:%S'), $MEDHPC_THREADS thread(s) per rank"
echo "launch: ${launcher[*]} ${medhpc_command[*]} $*"
"${launcher[@]}" "${medhpc_command[@]}" info
set +e
"${launcher[@]}" "${medhpc_command[@]}" "$@"
status=$?
set -e
case "$status" in
    0) echo "medhpc job $job_id: finished" ;;
    2) echo "medhpc job $job_id: usage or input error (exit 2): fix the arguments above" >&2 ;;
    130) echo "medhpc job $job_id: interrupted (exit 130)" >&2 ;;
    143) echo "medhpc job $job_id: stopped by the scheduler with a checkpoint saved (exit 143):" \
              "resubmit the same command with --resume appended" >&2 ;;
    *) echo "medhpc job $job_id: failed (exit $status): see the first error above" >&2 ;;
esac
exit "$status"
# ---- end common ----

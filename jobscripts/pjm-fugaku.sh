#!/bin/bash
# medhpc on Fugaku or Nagoya "Flow" Type I (Fujitsu PJM, A64FX: aarch64, 48 cores in 4 CMGs,
# no GPU): the CPU kernels, 4 ranks of 12 threads a node.
#
# Submit:  edit MEDHPC_ARGS below (or pjsub -x "MEDHPC_ARGS=pet-recon --sinogram ..."), then:
#          pjsub jobscripts/pjm-fugaku.sh              (pjsub passes no arguments to a script)
#   e.g.   MEDHPC_ARGS="pet-recon --sinogram sino.h5 --out recon.nii.gz --device cpu"
# Edit:    -g (your group: mandatory on Fugaku), rscgrp (small: up to 384 nodes), node,
#          elapse, PJM_LLIO_GFSCACHE (the /vol000N volumes your data and software live on),
#          the "site" block (Python: a Spack python + virtual environment, or an aarch64 image).
# LLIO:    the numba cache goes to the node-local LLIO area (PJM_LOCALTMP, --llio
#          localtmp-size); `llio_transfer` your virtual environment for jobs of many nodes.
# Exit 143: a checkpoint was saved on SIGTERM (pjdel, elapse): resubmit with --resume added.
#PJM -L rscgrp=small
#PJM -L node=1
#PJM -L elapse=01:00:00
#PJM --mpi max-proc-per-node=4
#PJM -g CHANGE_ME
#PJM -x PJM_LLIO_GFSCACHE=/vol0004
#PJM --llio localtmp-size=1Gi
#PJM -j
#PJM -S
set -euo pipefail

job_id="${PJM_JOBID:-$$}"
workdir="${PJM_O_WORKDIR:-$PWD}"
node_tmp="${PJM_LOCALTMP:-/tmp}"
submit="pjsub jobscripts/pjm-fugaku.sh"
ranks="${PJM_MPI_PROC:-1}"
MEDHPC_THREADS="${MEDHPC_THREADS:-12}"                # one rank per CMG of 12 cores

# ---- site: edit for your cluster ----
# . /vol0004/apps/oss/spack/share/spack/setup-env.sh && spack load python   # or your own Python
MEDHPC_ARGS="${MEDHPC_ARGS:-}"      # the subcommand and its arguments
MEDHPC_VENV="${MEDHPC_VENV:-}"      # a virtual environment holding medhpc; activated when set
MEDHPC_LAUNCH="${MEDHPC_LAUNCH:-mpiexec -n $ranks}"   # Fujitsu MPI's mpiexec
MEDHPC_BIN="${MEDHPC_BIN:-medhpc}"
MEDHPC_CONTAINER="${MEDHPC_CONTAINER:-}"              # an aarch64 image (.sif) to run medhpc in
MEDHPC_CONTAINER_RUNTIME="${MEDHPC_CONTAINER_RUNTIME:-singularity}"
# ---- end site ----

gpu_flags=()
env_flag="${MEDHPC_ENV_FLAG:-}"

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

#!/bin/bash
# medhpc inside a Singularity/Apptainer image on a PBS Pro GPU cluster (Reedbush-H style).
# Hybrid MPI model: the host's mpirun starts one container per rank; the image's MPI (MPICH,
# see containers/README.md) must match the host launcher (an MPICH-family mpirun: Intel MPI,
# MVAPICH2, MPICH).
#
# Build:   apptainer build medhpc.sif containers/medhpc.def   (then copy medhpc.sif to the site)
# Submit:  edit MEDHPC_ARGS below (or qsub -v "MEDHPC_ARGS='pet-recon --sinogram ...'"), then:
#          qsub jobscripts/pbs-gpu-singularity.sh
# Edit:    -q, -W group_list, select/mpiprocs/ompthreads, walltime; the "site" block: the
#          modules for the MPI and singularity, MEDHPC_CONTAINER, MEDHPC_CONTAINER_BIND.
# Exit 143: a checkpoint was saved on SIGTERM: resubmit with --resume added to MEDHPC_ARGS.
#PBS -q h-regular
#PBS -l select=1:mpiprocs=2:ompthreads=18
#PBS -W group_list=CHANGE_ME
#PBS -l walltime=01:00:00
#PBS -j oe
#PBS -N medhpc
set -euo pipefail

job_id="${PBS_JOBID:-$$}"
workdir="${PBS_O_WORKDIR:-$PWD}"
node_tmp="${TMPDIR:-/tmp}"
submit="qsub jobscripts/pbs-gpu-singularity.sh"
ranks=1
if [ -n "${PBS_NODEFILE:-}" ] && [ -f "$PBS_NODEFILE" ]; then
    ranks=$(wc -l < "$PBS_NODEFILE")    # one line per MPI process (mpiprocs)
fi
MEDHPC_THREADS="${MEDHPC_THREADS:-${OMP_NUM_THREADS:-1}}"   # ompthreads sets OMP_NUM_THREADS

# ---- site: edit for your cluster ----
# module load singularity intel-mpi
MEDHPC_ARGS="${MEDHPC_ARGS:-}"      # the subcommand and its arguments
MEDHPC_LAUNCH="${MEDHPC_LAUNCH:-mpirun -np $ranks}"
MEDHPC_BIN="medhpc"                 # the command inside the image
MEDHPC_CONTAINER="${MEDHPC_CONTAINER:-$workdir/medhpc.sif}"
MEDHPC_CONTAINER_RUNTIME="${MEDHPC_CONTAINER_RUNTIME:-singularity}"
MEDHPC_CONTAINER_BIND="${MEDHPC_CONTAINER_BIND:-}"
# ---- end site ----

gpu_flags=(--nv)
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

#!/bin/bash
# medhpc on a Slurm cluster with NVIDIA GPUs: one MPI rank per GPU.
#
# Submit:  sbatch jobscripts/slurm-gpu.sh SUBCOMMAND [ARGS...]
#   e.g.   sbatch jobscripts/slurm-gpu.sh pet-recon --sinogram sino.h5 --out recon.nii.gz --device cuda
# Edit:    the #SBATCH lines: account, partition, nodes, --ntasks-per-node = GPUs per node,
#          --cpus-per-task = cores per node / GPUs per node (it becomes MEDHPC_THREADS), time;
#          and the "site" block below (modules, virtual environment).
# Launch:  srun --mpi=pmix; "srun --mpi=pmi2" for an MPI built with PMI2, or the site's
#          "mpiexec" when the MPI is not Slurm-aware (MEDHPC_LAUNCH="mpiexec").
# Signal:  Slurm sends SIGUSR1 5 minutes before the time limit (--signal); medhpc saves a
#          checkpoint and exits 143: resubmit the same command with --resume appended.
# Container variant: slurm-gpu-apptainer.sh (or set MEDHPC_CONTAINER=medhpc.sif here).
#SBATCH --job-name=medhpc
##SBATCH --account=CHANGE_ME
#SBATCH --partition=gpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --signal=USR1@300
#SBATCH --output=medhpc-%j.out
set -euo pipefail

# ---- site: edit for your cluster ----
# module load openmpi cuda          # the MPI your mpi4py uses (python -m mpi4py --mpi-library)
MEDHPC_VENV="${MEDHPC_VENV:-}"      # a virtual environment holding medhpc; activated when set
MEDHPC_LAUNCH="${MEDHPC_LAUNCH:-srun --mpi=pmix --cpu-bind=cores}"
MEDHPC_BIN="${MEDHPC_BIN:-medhpc}"
MEDHPC_CONTAINER="${MEDHPC_CONTAINER:-}"              # an image (.sif): run medhpc inside it
MEDHPC_CONTAINER_RUNTIME="${MEDHPC_CONTAINER_RUNTIME:-apptainer}"
# ---- end site ----

job_id="${SLURM_JOB_ID:-$$}"
workdir="${SLURM_SUBMIT_DIR:-$PWD}"
node_tmp="${TMPDIR:-/tmp}"
submit="sbatch jobscripts/slurm-gpu.sh"
MEDHPC_THREADS="${MEDHPC_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
gpu_flags=(--nv)
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

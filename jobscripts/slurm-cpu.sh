#!/bin/bash
# medhpc on a Slurm cluster without GPUs (CPU kernels, numba threads per rank).
#
# Submit:  sbatch jobscripts/slurm-cpu.sh SUBCOMMAND [ARGS...]
#   e.g.   sbatch jobscripts/slurm-cpu.sh pet-recon --sinogram sino.h5 --out recon.nii.gz --device cpu
# Edit:    the #SBATCH lines: account, partition, nodes, --ntasks-per-node (one rank per
#          socket or NUMA domain is a good start), --cpus-per-task = cores per rank (it becomes
#          MEDHPC_THREADS), time; and the "site" block below.
# Launch:  srun --mpi=pmix; "srun --mpi=pmi2" or the site's "mpiexec" (MEDHPC_LAUNCH).
# Signal:  SIGUSR1 5 minutes before the time limit: medhpc saves a checkpoint and exits 143;
#          resubmit the same command with --resume appended.
#SBATCH --job-name=medhpc
##SBATCH --account=CHANGE_ME
#SBATCH --partition=cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=16
#SBATCH --time=01:00:00
#SBATCH --signal=USR1@300
#SBATCH --output=medhpc-%j.out
set -euo pipefail

# ---- site: edit for your cluster ----
# module load openmpi               # the MPI your mpi4py uses (python -m mpi4py --mpi-library)
MEDHPC_VENV="${MEDHPC_VENV:-}"      # a virtual environment holding medhpc; activated when set
MEDHPC_LAUNCH="${MEDHPC_LAUNCH:-srun --mpi=pmix --cpu-bind=cores}"
MEDHPC_BIN="${MEDHPC_BIN:-medhpc}"
MEDHPC_CONTAINER="${MEDHPC_CONTAINER:-}"              # an image (.sif): run medhpc inside it
MEDHPC_CONTAINER_RUNTIME="${MEDHPC_CONTAINER_RUNTIME:-apptainer}"
# ---- end site ----

job_id="${SLURM_JOB_ID:-$$}"
workdir="${SLURM_SUBMIT_DIR:-$PWD}"
node_tmp="${TMPDIR:-/tmp}"
submit="sbatch jobscripts/slurm-cpu.sh"
MEDHPC_THREADS="${MEDHPC_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
gpu_flag=""
env_flag=""

# ---- hand over to medhpc-job: the part every job script shares (jobscripts/README.md) ----
export MEDHPC_JOB_ID="$job_id" MEDHPC_WORKDIR="$workdir" MEDHPC_NODE_TMP="$node_tmp" \
    MEDHPC_SUBMIT_HINT="$submit" MEDHPC_GPU_FLAG="$gpu_flag" MEDHPC_ENV_FLAG="$env_flag" \
    MEDHPC_THREADS MEDHPC_ARGS MEDHPC_VENV MEDHPC_LAUNCH MEDHPC_BIN MEDHPC_CONTAINER \
    MEDHPC_CONTAINER_RUNTIME MEDHPC_CONTAINER_BIND
# MEDHPC_JOB, else medhpc-job in MEDHPC_VENV or on PATH (pip install), else the checkout's.
job="${MEDHPC_JOB:-$(PATH="${MEDHPC_VENV:+$MEDHPC_VENV/bin:}$PATH" command -v medhpc-job \
                     || echo "$workdir/bin/medhpc-job")}"
if [ ! -x "$job" ]; then
    echo "medhpc job: launcher $job not found: set MEDHPC_JOB, install medhpc" \
         "or submit from a medhpc checkout" >&2
    exit 2
fi
exec "$job" "$@"

#!/bin/bash
# medhpc inside an Apptainer/Singularity image on a Slurm cluster with NVIDIA GPUs.
# Hybrid MPI model: srun starts one container per rank; the MPI in the image (MPICH, see
# containers/README.md) must speak the PMI that srun offers (--mpi=pmi2 for MPICH).
#
# Build:   apptainer build medhpc.sif containers/medhpc.def      (once, anywhere)
# Submit:  sbatch jobscripts/slurm-gpu-apptainer.sh SUBCOMMAND [ARGS...]
#   e.g.   sbatch jobscripts/slurm-gpu-apptainer.sh pet-recon --sinogram sino.h5 --out recon.nii.gz
# Edit:    the #SBATCH lines (as in slurm-gpu.sh), MEDHPC_CONTAINER (the image) and
#          MEDHPC_CONTAINER_BIND (data folders outside the submit folder, comma-separated).
# Signal:  SIGUSR1 5 minutes before the time limit: checkpoint, exit 143, resubmit with --resume.
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
# module load apptainer             # where the runtime is a module
MEDHPC_LAUNCH="${MEDHPC_LAUNCH:-srun --mpi=pmi2 --cpu-bind=cores}"
MEDHPC_BIN="medhpc"                 # the command inside the image
MEDHPC_CONTAINER="${MEDHPC_CONTAINER:-${SLURM_SUBMIT_DIR:-$PWD}/medhpc.sif}"
MEDHPC_CONTAINER_RUNTIME="${MEDHPC_CONTAINER_RUNTIME:-apptainer}"   # or singularity
MEDHPC_CONTAINER_BIND="${MEDHPC_CONTAINER_BIND:-}"
# ---- end site ----

job_id="${SLURM_JOB_ID:-$$}"
workdir="${SLURM_SUBMIT_DIR:-$PWD}"
node_tmp="${TMPDIR:-/tmp}"
submit="sbatch jobscripts/slurm-gpu-apptainer.sh"
MEDHPC_THREADS="${MEDHPC_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
gpu_flag=--nv
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

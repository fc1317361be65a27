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

gpu_flag=--nv
env_flag="${MEDHPC_ENV_FLAG:-}"

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

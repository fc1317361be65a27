#!/bin/bash
# medhpc on a PBS Pro cluster with NVIDIA GPUs (Reedbush-H style: 2 x P100 and 36 cores a
# node): one MPI rank per GPU, ompthreads cores per rank.
#
# Submit:  edit MEDHPC_ARGS below (or pass it: qsub -v "MEDHPC_ARGS='pet-recon --sinogram ...'"),
#          then: qsub jobscripts/pbs-gpu.sh        (qsub passes no arguments to a job script)
#   e.g.   MEDHPC_ARGS="pet-recon --sinogram sino.h5 --out recon.nii.gz --device cuda"
# Edit:    -q (queue), -W group_list (your group), select=NODES:mpiprocs=GPUS_PER_NODE:
#          ompthreads=CORES_PER_GPU (generic form: select=N:ncpus=C:mpiprocs=P:ngpus=G),
#          walltime; the "site" block (modules: an MPI and CUDA, or a virtual environment).
# Launch:  mpirun -np <ranks from $PBS_NODEFILE>; set MEDHPC_LAUNCH to the site's form.
#          Open MPI does not forward the environment to other nodes: set MEDHPC_ENV_FLAG=-x.
# Exit 143: a checkpoint was saved on SIGTERM (qdel, walltime): resubmit with --resume added.
# Container variant: pbs-gpu-singularity.sh (or set MEDHPC_CONTAINER=medhpc.sif here).
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
submit="qsub jobscripts/pbs-gpu.sh"
ranks=1
if [ -n "${PBS_NODEFILE:-}" ] && [ -f "$PBS_NODEFILE" ]; then
    ranks=$(wc -l < "$PBS_NODEFILE")    # one line per MPI process (mpiprocs)
fi
MEDHPC_THREADS="${MEDHPC_THREADS:-${OMP_NUM_THREADS:-1}}"   # ompthreads sets OMP_NUM_THREADS

# ---- site: edit for your cluster ----
# module load cuda intel-mpi        # the MPI your mpi4py uses (python -m mpi4py --mpi-library)
MEDHPC_ARGS="${MEDHPC_ARGS:-}"      # the subcommand and its arguments
MEDHPC_VENV="${MEDHPC_VENV:-}"      # a virtual environment holding medhpc; activated when set
MEDHPC_LAUNCH="${MEDHPC_LAUNCH:-mpirun -np $ranks}"
MEDHPC_BIN="${MEDHPC_BIN:-medhpc}"
MEDHPC_CONTAINER="${MEDHPC_CONTAINER:-}"              # an image (.sif): run medhpc inside it
MEDHPC_CONTAINER_RUNTIME="${MEDHPC_CONTAINER_RUNTIME:-singularity}"
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

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

gpu_flag=""
if command -v nvidia-smi > /dev/null 2>&1; then
    gpu_flag=--nv
fi
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

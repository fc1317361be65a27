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

gpu_flag=""
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

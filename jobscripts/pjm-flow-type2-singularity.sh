#!/bin/bash
# medhpc inside a Singularity image on Nagoya "Flow" Type II (PJM, 4 x V100 a node).
# Singularity needs -L jobenv=singularity on Flow (and Wisteria). Hybrid MPI model: the host's
# Open MPI mpirun starts one container per rank, so the image must hold an Open MPI of the
# same major version and PMIx (build it with the Open MPI option: containers/README.md).
#
# Build:   apptainer build --build-arg MPI=openmpi medhpc.sif containers/medhpc.def
# Submit:  edit MEDHPC_ARGS below (or pjsub -x "MEDHPC_ARGS=pet-recon --sinogram ..."), then:
#          pjsub jobscripts/pjm-flow-type2-singularity.sh
# Edit:    rscgrp (cx-share with gpu=1, cx-single, cx-small, cx-middle, cx-large), node,
#          --mpi proc (= 4 x nodes), elapse; the "site" block: modules, MEDHPC_CONTAINER,
#          MEDHPC_CONTAINER_BIND (data folders outside the submit folder, comma-separated).
# Exit 143: a checkpoint was saved on SIGTERM: resubmit with --resume added to MEDHPC_ARGS.
#PJM -L rscgrp=cx-small
#PJM -L node=1
#PJM --mpi proc=4
#PJM -L elapse=01:00:00
#PJM -L jobenv=singularity
#PJM -j
#PJM -S
set -euo pipefail

job_id="${PJM_JOBID:-$$}"
workdir="${PJM_O_WORKDIR:-$PWD}"
node_tmp="${PJM_LOCALTMP:-/tmp}"
submit="pjsub jobscripts/pjm-flow-type2-singularity.sh"
ranks="${PJM_MPI_PROC:-1}"
ranks_per_node="${MEDHPC_RANKS_PER_NODE:-4}"          # one per GPU
MEDHPC_THREADS="${MEDHPC_THREADS:-10}"                # 40 cores / 4 ranks per node

# ---- site: edit for your cluster ----
# module load gcc cuda openmpi_cuda singularity
MEDHPC_ARGS="${MEDHPC_ARGS:-}"      # the subcommand and its arguments
MEDHPC_LAUNCH="${MEDHPC_LAUNCH:-mpirun -machinefile ${PJM_O_NODEINF:-hosts} --mca orte_tmpdir_base /tmp/$job_id -npernode $ranks_per_node -n $ranks}"
MEDHPC_BIN="medhpc"                 # the command inside the image
MEDHPC_CONTAINER="${MEDHPC_CONTAINER:-$workdir/medhpc.sif}"
MEDHPC_CONTAINER_RUNTIME="${MEDHPC_CONTAINER_RUNTIME:-singularity}"
MEDHPC_CONTAINER_BIND="${MEDHPC_CONTAINER_BIND:-}"
# ---- end site ----

gpu_flag=--nv
env_flag="${MEDHPC_ENV_FLAG--x}"

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

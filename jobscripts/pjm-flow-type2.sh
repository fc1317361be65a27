#!/bin/bash
# medhpc on a Fujitsu PJM GPU system (Nagoya "Flow" Type II: 4 x V100 and 40 cores a node):
# one MPI rank per GPU, 10 cores per rank.
#
# Submit:  edit MEDHPC_ARGS below (or pjsub -x "MEDHPC_ARGS=pet-recon --sinogram ..."), then:
#          pjsub jobscripts/pjm-flow-type2.sh          (pjsub passes no arguments to a script)
#   e.g.   MEDHPC_ARGS="pet-recon --sinogram sino.h5 --out recon.nii.gz --device cuda"
# Edit:    rscgrp: cx-share (1 GPU, with -L gpu=1), cx-single (1 node, gpu=4), cx-small
#          (<= 8 nodes), cx-middle (<= 16), cx-large (<= 64); node, --mpi proc (= 4 x nodes),
#          elapse; the "site" block (modules, virtual environment).
# CUDA:    Flow's public scripts load CUDA 11.4; numba-cuda needs a CUDA 12 driver on the node
#          for V100 (pip install 'medhpc[cuda12]'): check `nvidia-smi` on a compute node first.
# Launch:  Open MPI's mpirun with the machine file $PJM_O_NODEINF; -x forwards medhpc's
#          environment to the other nodes.
# Exit 143: a checkpoint was saved on SIGTERM (pjdel, elapse): resubmit with --resume added.
# Container variant: pjm-flow-type2-singularity.sh.
#PJM -L rscgrp=cx-small
#PJM -L node=1
#PJM --mpi proc=4
#PJM -L elapse=01:00:00
#PJM -j
#PJM -S
set -euo pipefail

job_id="${PJM_JOBID:-$$}"
workdir="${PJM_O_WORKDIR:-$PWD}"
node_tmp="${PJM_LOCALTMP:-/tmp}"
submit="pjsub jobscripts/pjm-flow-type2.sh"
ranks="${PJM_MPI_PROC:-1}"
ranks_per_node="${MEDHPC_RANKS_PER_NODE:-4}"          # one per GPU
MEDHPC_THREADS="${MEDHPC_THREADS:-10}"                # 40 cores / 4 ranks per node

# ---- site: edit for your cluster ----
# module load gcc cuda openmpi_cuda   # the MPI your mpi4py uses (python -m mpi4py --mpi-library)
MEDHPC_ARGS="${MEDHPC_ARGS:-}"      # the subcommand and its arguments
MEDHPC_VENV="${MEDHPC_VENV:-}"      # a virtual environment holding medhpc; activated when set
MEDHPC_LAUNCH="${MEDHPC_LAUNCH:-mpirun -machinefile ${PJM_O_NODEINF:-hosts} --mca orte_tmpdir_base /tmp/$job_id -npernode $ranks_per_node -n $ranks}"
MEDHPC_BIN="${MEDHPC_BIN:-medhpc}"
MEDHPC_CONTAINER="${MEDHPC_CONTAINER:-}"              # an image (.sif): run medhpc inside it
MEDHPC_CONTAINER_RUNTIME="${MEDHPC_CONTAINER_RUNTIME:-singularity}"
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

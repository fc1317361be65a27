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

gpu_flags=(--nv)
env_flag="${MEDHPC_ENV_FLAG--x}"

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

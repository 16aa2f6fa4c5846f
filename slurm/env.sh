# The only cluster-specific file: sourced by every training job before `srun`. Edit it for your
# cluster (network interfaces, modules, virtual environment); the job scripts stay as they are.

# module load cuda/12.4 nccl        # if your cluster uses environment modules

# NCCL over InfiniBand / RoCE. Name the interfaces when auto-detection picks the wrong ones.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_ASYNC_ERROR_HANDLING=1          # a lost rank ends the collective instead of hanging
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# export NCCL_SOCKET_IFNAME=ib0             # bootstrap interface
# export NCCL_IB_HCA=mlx5                   # InfiniBand adapters
# export GLOO_SOCKET_IFNAME=eth0            # CPU runs (gloo): the interface between nodes

# Where Python comes from (default: the checkout's .venv made by `make setup`).
# export PYTHON=/path/to/venv/bin/python

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# Sourced by the batch scripts beside it. Edit these paths for your cluster.
export DATAROOT=${DATAROOT:-/data/sets/nuscenes}      # nuScenes v1.0-trainval + map expansion (maps/expansion/*.json)
export VERSION=${VERSION:-v1.0-trainval}
export WORK=${WORK:-$HOME/bevctl-runs/nuscenes}        # labels.zarr, gt.zarr, runs/
export PRESET=${PRESET:-small}                          # small | base (configs/nuscenes/*_${PRESET}.yaml)
export CONFIGS=${CONFIGS:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/configs/nuscenes}
export BEVCTL=${BEVCTL:-bevctl}                         # the console script of your bevctl install
mkdir -p "$WORK/runs"

# Requeue-friendly: a training run continues from RUN/last.pt when one exists.
resume_flag() { [ -f "$1/last.pt" ] && echo "--resume" || true; }

# torchrun over every node of the allocation (one process per GPU), rendezvous on the first node.
torchrun_all() {
  local head
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  srun --ntasks-per-node=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc-per-node "${GPUS_PER_NODE:-8}" \
    --rdzv-backend c10d --rdzv-endpoint "$head:29500" --rdzv-id "$SLURM_JOB_ID" \
    -m bevctl.cli "$@"
}

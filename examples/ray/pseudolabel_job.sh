#!/bin/bash
# Pseudo-label nuScenes on an existing Ray cluster (e.g. 4 nodes x 8 GPUs = 32 actors).
# Every node must see DATAROOT and the output path (a shared filesystem), and have bevctl installed.
#   RAY_ADDRESS=http://head:8265 ./examples/ray/pseudolabel_job.sh 32
# The job is resumable: resubmitting it skips samples already done.
set -euo pipefail
GPUS=${1:-32}
DATAROOT=${DATAROOT:-/data/sets/nuscenes}
OUT=${OUT:-/shared/bevctl/labels.zarr}
ray job submit --address "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster}" -- \
  bevctl pseudolabel --address auto --dataroot "$DATAROOT" --version v1.0-trainval --out "$OUT" \
    --model facebook/mask2former-swin-large-mapillary-vistas-semantic \
    --gpus "$GPUS" --batch-size 6 --resolution 450x800 --confidence --on-error skip

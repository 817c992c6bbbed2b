#!/bin/bash
# Pseudo-label nuScenes on an existing Ray cluster (e.g. 4 nodes x 8 GPUs = 32 actors).
# Every node must see DATAROOT and the output path (a shared filesystem), and have bevctl installed.
# Token authentication (docs/scaling.md, "Authentication"): the cluster was started with
# RAY_AUTH_MODE=token and a token; this shell needs the same two (the dashboard checks the token),
# the job's driver inherits them from the cluster.
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray-bevctl-token   # or RAY_AUTH_TOKEN=...
#   RAY_ADDRESS=http://head:8265 ./examples/ray/pseudolabel_job.sh 32
# The job is resumable: resubmitting it skips samples already done.
set -euo pipefail
GPUS=${1:-32}
: "${RAY_AUTH_MODE:?set RAY_AUTH_MODE=token and the cluster token (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)}"
DATAROOT=${DATAROOT:-/data/sets/nuscenes}
OUT=${OUT:-/shared/bevctl/labels.zarr}
ray job submit --address "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster}" -- \
  bevctl pseudolabel --address auto --dataroot "$DATAROOT" --version v1.0-trainval --out "$OUT" \
    --model facebook/mask2former-swin-large-mapillary-vistas-semantic \
    --gpus "$GPUS" --batch-size 6 --resolution 450x800 --confidence --on-error skip

#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice: the same `glam train` runs once per worker
# (JAX's multi-controller runtime; jax.distributed finds the other workers by itself).
#
#   launch/tpu_pod.sh TPU_NAME ZONE GLAM_TRAIN_FLAGS...
#   launch/tpu_pod.sh my-v4-64 us-central2-b --gin_file=configs/runs/pretrain.gin \
#       --gin_file=configs/models/glam_1.7b_64e.gin --gin_file=configs/mesh/ep8.gin \
#       --gin.mesh_shape.expert=32 --gin.mesh_shape.data=-1 --model_dir=gs://my-bucket/glam-1.7b
#
# The workers need this repository at $GLAM_REPO_DIR and its environment installed, e.g. once:
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#       --command="git clone https://github.com/OWNER/glam ~/glam && cd ~/glam && make install"
# --model_dir must be a path every worker shares (a gs:// bucket).
#
# Environment:
#   GLAM_PROJECT   gcloud project (default: gcloud's configured one)
#   GLAM_REPO_DIR  the repository on the workers (default: ~/glam)
#   GLAM_PYTHON    interpreter on the workers (default: .venv/bin/python in GLAM_REPO_DIR)
#   GLAM_DRY_RUN=1 print the gcloud command instead of running it
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE GLAM_TRAIN_FLAGS... (at least --model_dir)" >&2
  exit 2
fi
TPU_NAME="$1"; ZONE="$2"; shift 2
if ! printf '%s\n' "$@" | grep -q -- '^--model_dir='; then
  echo "$0: missing --model_dir=PATH (a gs:// path all workers share)" >&2
  exit 2
fi
REPO_DIR="${GLAM_REPO_DIR:-~/glam}"
PYTHON="${GLAM_PYTHON:-.venv/bin/python}"
PROJECT_FLAG=()
[[ -n "${GLAM_PROJECT:-}" ]] && PROJECT_FLAG=(--project="$GLAM_PROJECT")

# The remote command line, each argument shell-quoted.
REMOTE="cd $REPO_DIR && GLAM_DISTRIBUTED_AUTO=1 $PYTHON -m glam train$(printf ' %q' "$@")"
COMMAND=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all
         --command="$REMOTE")

if [[ "${GLAM_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${COMMAND[@]}"; echo
  exit 0
fi
exec "${COMMAND[@]}"

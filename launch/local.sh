#!/usr/bin/env bash
# Multi-process training on one machine: N copies of `glam train`, joined by jax.distributed
# (gloo CPU collectives). Each process reads only its own rows of the global batch; process 0
# writes metrics, and the checkpoint holds every process's input position.
#
#   launch/local.sh N GLAM_TRAIN_FLAGS...
#   launch/local.sh 2 --gin_file=configs/runs/pretrain.gin --gin_file=configs/models/glam_tiny.gin \
#       --gin_file=configs/mesh/ep8.gin --model_dir=/tmp/mp_run          # with 4 devices per process
#
# Environment:
#   GLAM_DEVICES_PER_PROCESS  simulated CPU devices per process (default 4; CPU only)
#   GLAM_PORT                 coordinator port on localhost (default: a free one)
#   PYTHON                    interpreter (default: .venv/bin/python if present, else python3)
#   GLAM_DRY_RUN=1            print the commands (with their environment) instead of running them
# Every process's output goes to the terminal prefixed with [process i]; the exit code is the
# first failure's (the others are then stopped), or 0.
set -euo pipefail

usage() { echo "usage: $0 NUM_PROCESSES GLAM_TRAIN_FLAGS..." >&2; exit 2; }
[[ $# -ge 1 ]] || usage
NUM_PROCESSES="$1"; shift
[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || { echo "$0: NUM_PROCESSES=$NUM_PROCESSES: expected a positive integer" >&2; exit 2; }
DEVICES="${GLAM_DEVICES_PER_PROCESS:-4}"
[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || { echo "$0: GLAM_DEVICES_PER_PROCESS=$DEVICES: expected a positive integer" >&2; exit 2; }
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
PORT="${GLAM_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}"

env_for() {  # the environment of process $1
  echo "GLAM_COORDINATOR=localhost:$PORT GLAM_NUM_PROCESSES=$NUM_PROCESSES GLAM_PROCESS_ID=$1" \
       "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES"
}

if [[ "${GLAM_DRY_RUN:-0}" == 1 ]]; then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    echo "$(env_for "$i") $PYTHON -m glam train $*"
  done
  exit 0
fi

cd "$REPO"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < NUM_PROCESSES; i++)); do
  # shellcheck disable=SC2046  # env_for's words are NAME=VALUE pairs
  ( env $(env_for "$i") "$PYTHON" -m glam train "$@" 2>&1 | sed -u "s/^/[process $i] /" ; exit "${PIPESTATUS[0]}" ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  code=0
  wait "$pid" || code=$?
  if [[ $code != 0 && $status == 0 ]]; then status=$code; cleanup; fi
done
exit "$status"

#!/usr/bin/env bash
# The main job: set up what is missing, then FedAvg on MNIST (extra args go to `edgeray run`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/edgeray" run fedavg --config configs/fedavg_mnist.yaml "$@"

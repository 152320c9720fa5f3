# Sourced by scripts/setup.sh and scripts/assets/*.sh: fetch one file from PyPI without
# installing it, and check its sha256 before anything reads it.
#   pypi_fetch LABEL "NAME==VERSION" SHA256 DIR [--only-binary|--no-binary]
# Downloads with `$VENV/bin/pip download --no-deps` into DIR and prints the downloaded file's path;
# on a failed download or a hash mismatch it says so on stderr (prefixed with LABEL) and returns 1.
pypi_fetch() {
  local label="$1" spec="$2" sha="$3" dir="$4" kind="${5:---only-binary}"
  if [[ ! -x "$VENV/bin/pip" ]]; then
    echo "$label: no pip at $VENV/bin/pip; set VENV to the project's virtualenv" >&2
    return 1
  fi
  mkdir -p "$dir"
  if ! "$VENV/bin/pip" download --no-deps "$kind" :all: --quiet "$spec" -d "$dir" >&2; then
    echo "$label: pip download of $spec failed (is PyPI reachable?)" >&2
    return 1
  fi
  local name="${spec%%==*}" version="${spec##*==}" file got
  file="$(ls "$dir"/* 2>/dev/null | grep -iE "/${name//[-_]/[-_]}-${version}[-.]" | head -n1)"
  if [[ -z "$file" ]]; then
    echo "$label: pip download of $spec left no file in $dir" >&2
    return 1
  fi
  got="$(sha256sum "$file" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    echo "$label: sha256 mismatch for $file: expected $sha, got $got" >&2
    return 1
  fi
  echo "$file"
}

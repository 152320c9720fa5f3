"""Regenerate docs/reference.md from the config dataclasses (their field docs are the source).

    .venv/bin/python scripts/gen_reference.py          # rewrite the file
    .venv/bin/python scripts/gen_reference.py --check  # exit 1 if it is out of date (a test runs this)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeray.config import describe  # noqa: E402
from pipelines.fl import FLConfig  # noqa: E402

HEADER = """# Reference: `edgeray run` configuration

Generated from the config dataclasses by `scripts/gen_reference.py`; do not edit by hand.
Every field can be set in the YAML file given to `--config` or on the command line with
`--set dotted.name=value`. Unknown keys, wrong types and out-of-range values stop the run at
start with a one-line error naming the field (exit code 2).

## `edgeray run fedavg|fedprox` (`pipelines.fl.FLConfig`)

| field | default | allowed | meaning |
|---|---|---|---|
"""


def render() -> str:
    rows = [f"| `{name}` | `{default!r}` | {allowed} | {doc} |" for name, default, doc, allowed in describe(FLConfig)]
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    target = ROOT / "docs" / "reference.md"
    if "--check" in sys.argv:
        sys.exit(0 if target.is_file() and target.read_text() == render() else 1)
    target.write_text(render())

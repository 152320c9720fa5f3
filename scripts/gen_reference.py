"""Regenerate docs/reference.md from the config dataclasses and the registry (their docs are the source).

    .venv/bin/python scripts/gen_reference.py          # rewrite the file
    .venv/bin/python scripts/gen_reference.py --check  # exit 1 if it is out of date (a test runs this)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.config import FLConfig  # noqa: E402
from edgeray.config import describe  # noqa: E402
from pipelines.registry import DATASETS, EVALUATIONS, MODELS, STRATEGIES, own_settings  # noqa: E402

HEADER = """# Reference: `edgeray run` configuration

Generated from the config dataclasses and `pipelines/registry.py` by `scripts/gen_reference.py`;
do not edit by hand. Every field can be set in the YAML file given to `--config` or on the
command line with `--set dotted.name=value`. Unknown keys, wrong types and out-of-range values
stop the run at start with a one-line error naming the field (exit code 2).

## `edgeray run <strategy>` (`actors.config.FLConfig`)

| field | default | allowed | meaning |
|---|---|---|---|
"""


def table(rows) -> list[str]:
    return [f"| `{name}` | `{default!r}` | {allowed} | {doc} |" for name, default, doc, allowed in rows]


def registry(title: str, entries: dict, extra=lambda e: "") -> list[str]:
    lines = ["", f"## {title}", "", "| name | what it is | code |", "|---|---|---|"]
    return lines + [f"| `{name}` | {e.summary}{extra(e)} | `{e.target}` |" for name, e in entries.items()]


def render() -> str:
    lines = table(describe(FLConfig))
    lines += ["", "## Strategies and their own settings (`strategy.params.*`)", "",
              "`strategy.clients_per_round`, `local_epochs`, `batch_size` and `lr` are common to all; each "
              "strategy adds its own settings under `strategy.params` (`--set strategy.params.mu=0.1`)."]
    for name, e in STRATEGIES.items():
        lines += ["", f"### `{name}`: {e.summary}", "", f"Code: `{e.target}`, settings: `{e.settings}`.", ""]
        own = own_settings(name)
        lines += (["| field | default | allowed | meaning |", "|---|---|---|---|", *table(own)] if own
                  else ["No settings of its own."])
    lines += registry("Models (`model.name`)", MODELS)
    lines += registry("Data sets (`data.dataset`)", DATASETS, lambda e: f" (evaluation: `{e.evaluation}`)")
    lines += registry("Evaluations (`data.evaluation`)", EVALUATIONS, lambda e: f" (training loss: `{e.loss}`)")
    return HEADER + "\n".join(lines) + "\n"


if __name__ == "__main__":
    target = ROOT / "docs" / "reference.md"
    if "--check" in sys.argv:
        sys.exit(0 if target.is_file() and target.read_text() == render() else 1)
    target.write_text(render())

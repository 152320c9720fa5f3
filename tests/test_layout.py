"""The layout rule of DESIGN.md: pipelines/ is pure (no Ray, nothing from actors/, serving/, rl/
or a CLI module), and the FL driver starts a run without importing torch or a model's code."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "actors", "serving", "rl", "edgeray.cli", "edgeray.launch", "edgeray.connect")


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of the file names, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_pipelines_import_neither_ray_nor_the_runtime_nor_a_cli():
    offenders = []
    files = sorted((ROOT / "pipelines").rglob("*.py"))
    assert len(files) >= 10
    for path in files:
        for name in imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_importing_every_pipelines_module_loads_no_ray():
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in sorted((ROOT / "pipelines").rglob("*.py"))]
    code = (f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'actors', 'serving')))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_driver_checks_a_config_without_torch_or_transformers():
    code = ("import sys\nfrom edgeray.config import load_config\nfrom actors.config import FLConfig\n"
            "import actors.driver, actors.cli\n"
            "cfg = load_config(FLConfig, 'configs/fedavg_tiny_lm.yaml', ['strategy.name=fedprox'])\n"
            "cfg.strategy.spec()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

"""The typed config loader: every bad value fails at load time with the field's name."""

from dataclasses import dataclass

import pytest

from edgeray.config import describe, load_config, param, section
from edgeray.errors import UserError


@dataclass
class Inner:
    alpha: float = param(0.5, "concentration", gt=0)
    scheme: str = param("iid", "split", choices=("iid", "dirichlet"))
    sizes: list[int] = param([1, 2], "sizes")


@dataclass
class Outer:
    rounds: int = param(3, "rounds", ge=1)
    deadline: float | None = param(None, "deadline", gt=0)
    flag: bool = param(False, "a flag")
    inner: Inner = section(Inner)

    def validate(self):
        if self.rounds == 13:
            raise UserError("rounds=13 is unlucky")


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 5\ninner:\n  scheme: dirichlet\n")
    cfg = load_config(Outer, path, ["inner.alpha=0.1", "deadline=2", "flag=true", "inner.sizes=[3, 4]"])
    assert (cfg.rounds, cfg.inner.scheme, cfg.inner.alpha, cfg.deadline, cfg.flag) == (5, "dirichlet", 0.1, 2.0, True)
    assert cfg.inner.sizes == [3, 4]
    assert Outer().inner.sizes is not Outer().inner.sizes  # list defaults are not shared


@pytest.mark.parametrize("overrides, message", [
    (["rounds=0"], "rounds=0 is out of range; it must be >= 1"),
    (["inner.alpha=0"], "inner.alpha=0.0 is out of range; it must be > 0"),
    (["inner.alpha=-1"], "inner.alpha=-1.0 is out of range"),
    (["inner.scheme=shard"], "inner.scheme='shard' is not allowed; choose one of: iid, dirichlet"),
    (["rounds=abc"], "rounds must be an integer, got 'abc'"),
    (["rounds=2.5"], "rounds must be an integer"),
    (["flag=maybe"], "flag must be true or false"),
    (["roundz=3"], "unknown config key roundz (did you mean rounds?)"),
    (["inner.alpah=3"], "unknown config key inner.alpah (did you mean inner.alpha?)"),
    (["inner=3"], "inner must be a mapping"),
    (["rounds"], "--set expects key=value"),
    (["rounds=13"], "rounds=13 is unlucky"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(UserError, match=None) as err:
        load_config(Outer, None, overrides)
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Outer, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(Outer, bad)


def test_describe_lists_every_field_with_its_doc():
    rows = {name: (doc, allowed) for name, _, doc, allowed in describe(Outer)}
    assert rows["inner.alpha"] == ("concentration", "> 0") and rows["rounds"] == ("rounds", ">= 1")
    assert rows["inner.scheme"][1] == "one of iid, dirichlet"


def test_reference_doc_is_up_to_date():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "gen_reference.py"), "--check"])
    assert proc.returncode == 0, "docs/reference.md is stale: run scripts/gen_reference.py"


def test_optional_fields_are_checked():
    assert load_config(Outer, None, ["deadline=null"]).deadline is None
    with pytest.raises(UserError, match="deadline must be a number, got 'soon'"):
        load_config(Outer, None, ["deadline=soon"])
    with pytest.raises(UserError, match="deadline=-1.0 is out of range"):
        load_config(Outer, None, ["deadline=-1"])


def test_set_keeps_the_text_of_a_text_field():
    """YAML reads `off` as False; a text field takes the text as written (docs write --set x=off)."""
    from actors.config import FLConfig

    cfg = load_config(FLConfig, None, ["runtime.warm_pool=off", "name=yes", "strategy.params.momentum=0.5"])
    assert cfg.runtime.warm_pool == "off" and cfg.name == "yes" and cfg.strategy.params["momentum"] == 0.5
    assert load_config(FLConfig, None, ["clock.trace=null"]).clock.trace is None
    with pytest.raises(UserError, match="rounds must be an integer, got 'off'"):
        load_config(FLConfig, None, ["rounds=off"])


def test_strategy_params_are_resolved_with_their_defaults():
    from actors.config import FLConfig

    cfg = load_config(FLConfig, None, ["strategy.name=fedprox", "strategy.params.mu=0.5", "strategy.lr=0.2"])
    assert cfg.strategy.params == {"momentum": 0.9, "weight_decay": 0.0, "keep_optimizer_state": False, "mu": 0.5}
    spec = cfg.strategy.spec()
    assert spec.name == "fedprox" and spec.settings["lr"] == 0.2 and spec.settings["mu"] == 0.5

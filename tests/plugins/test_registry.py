"""Plugin discovery through entry points: a third-party package installed with pip is listed and used; duplicate
names are rejected; a broken plugin is reported with its traceback and skipped."""
import subprocess
import sys
import textwrap

import pytest

from osengine import api
from osengine.cli import main as cli_main
from osengine.plugins.api import PluginError, Strategy
from osengine.plugins.registry import architectures, make_strategy, strategies

from tiny_models import make_model, model_output

THIRD_PARTY = '''
import torch
from osengine.plugin_api import Migration, Strategy


class HalfRange(Strategy):
    """Scales every channel whose range exceeds half of the widest one down to that half."""
    name = "halfrange"
    description = "third-party example: squeeze channels wider than half the widest"

    def __init__(self, fraction=0.5):
        self.fraction = float(fraction)

    def migrate(self, data):
        amax = torch.maximum(data.channel_min().abs(), data.channel_max().abs()).float()
        t = self.fraction * float(amax.max())
        return Migration(scale=(amax / t).clamp(min=1.0), info={"t": t})
'''


@pytest.fixture
def clean_registries():
    yield
    for reg in (strategies, architectures):
        reg.refresh()


def _install(tmp_path, name, module_source, entry_points):
    src = tmp_path / f"{name}-src"
    (src / name).mkdir(parents=True)
    (src / name / "__init__.py").write_text(textwrap.dedent(module_source))
    eps = "\n".join(f'{k} = "{v}"' for k, v in entry_points.items())
    (src / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name.replace("_", "-")}"
        version = "1.2.3"
        [tool.setuptools]
        packages = ["{name}"]
        [project.entry-points."osengine.strategies"]
        ''') + eps + "\n")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True)
    return target


def test_third_party_plugin_is_listed_and_used(tmp_path, monkeypatch, capsys, clean_registries, tokens):
    target = _install(tmp_path, "osengine_halfrange", THIRD_PARTY, {"halfrange": "osengine_halfrange:HalfRange"})
    monkeypatch.syspath_prepend(str(target))
    strategies.refresh()
    assert cli_main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "halfrange" in out and "osengine-halfrange 1.2.3" in out
    assert {"osplus", "smoothquant", "minmax", "halfrange"} <= set(strategies.names())
    assert {"llama", "opt", "bloom", "bert"} <= set(architectures.names())

    model = make_model("opt")
    ref = model_output(model, tokens)
    api.quantize(model, recipe="w8a8-static", strategy="halfrange", strategy_options={"fraction": 0.25},
                 calibration=tokens, progress=False)
    assert all(e["migration"]["t"] > 0 for e in model.osengine_report["sites"])
    assert (model_output(model, tokens) - ref).abs().max() < 1.0


def _dist_info(tmp_path, dist, group, entries):
    d = tmp_path / f"{dist}-0.1.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (d / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))


def test_broken_and_duplicate_plugins_are_skipped(tmp_path, monkeypatch, capsys, clean_registries):
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('this plugin needs a library that is missing')\n")
    (tmp_path / "dup_plugin.py").write_text(
        "from osengine.plugin_api import Strategy\n"
        "class Dup(Strategy):\n    name = 'minmax'\n    def migrate(self, data):\n        return None\n")
    _dist_info(tmp_path, "broken-plugins", "osengine.strategies",
               {"broken": "broken_plugin:Thing", "minmax": "dup_plugin:Dup", "notastrategy": "dup_plugin:Strategy"})
    monkeypatch.syspath_prepend(str(tmp_path))
    strategies.refresh()
    with pytest.warns(RuntimeWarning, match="skipping broken strategy plugin"):
        names = strategies.names()
    assert "broken" not in names and "osplus" in names and "minmax" in names
    errors = {n: tb for n, _, tb in strategies.errors}
    assert "needs a library that is missing" in errors["broken"] and "Traceback" in errors["broken"]
    assert "duplicate strategy plugin name 'minmax'" in errors["minmax"]
    assert "broken-plugins" in [s for n, s, _ in strategies.errors if n == "minmax"][0]  # the built-in one stays
    with pytest.raises(PluginError, match="failed to load"):
        strategies.get("broken")
    assert cli_main(["plugins"]) == 0
    assert "BROKEN strategy broken" in capsys.readouterr().out


def test_explicit_registration_and_errors(clean_registries):
    class Mine(Strategy):
        name = "mine"

        def migrate(self, data):
            return None

    strategies.register(Mine)
    assert make_strategy("mine").name == "mine"
    with pytest.raises(PluginError, match="duplicate"):
        strategies.register(Mine)
    with pytest.raises(PluginError, match="not a subclass"):
        strategies.register(int, name="int")
    with pytest.raises(PluginError, match="unknown strategy 'nope'.*osplus"):
        make_strategy("nope")
    with pytest.raises(PluginError, match="alpha"):
        make_strategy("smoothquant", {"alpha": 3})
    with pytest.raises(PluginError, match="rejected its options"):
        make_strategy("minmax", {"colour": 1})

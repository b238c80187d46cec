"""benchmarks/accuracy.py's configuration syntax: composed strategies, options, weight rounding, kept layers."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("yaml")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy.py"


def load_script():
    spec = importlib.util.spec_from_file_location("osengine_bench_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config,expected", [
    ("fp", ("fp", None, [], {}, None, False)),
    ("osplus:w8a8-static", ("osplus", "w8a8-static", [], {}, None, False)),
    ("rotate+osplus:w4a4-token+gptq", ("rotate+osplus", "w4a4-token", [], {}, "gptq", False)),
    ("rotate+osplus+seed=3+shift=runtime:w6a6-token:down_proj",
     ("rotate+osplus", "w6a6-token", ["down_proj"], {"seed": 3, "shift": "runtime"}, None, False)),
    ("osplus+max_grid_steps=0:w6a6-token+prefix", ("osplus", "w6a6-token", [], {"max_grid_steps": 0}, None, True)),
])
def test_configurations_parse(config, expected):
    assert load_script()._parse(config) == expected


def test_an_unknown_suffix_is_refused():
    with pytest.raises(SystemExit, match=r"\+gptq or \+nearest"):
        load_script()._parse("rotate:w4a4-token+fast")

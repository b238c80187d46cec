"""The package's layers (docs/architecture.md), read from the source: every import of an osengine module, at module
level or inside a function, goes to the same room or a lower layer; rooms of one layer do not import each other; no
module imports itself back through others (no cycle); the engine room needs only numpy and the extension."""
import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "osengine"

# Room -> layer, lowest first (docs/architecture.md). A room is a sub-package or a top-level module.
LAYERS = {
    "_C": -1,                     # the compiled extension
    "engine": 0,
    "quant": 1,
    "plugins": 2,
    "calibrate": 3, "runtime": 3, "io": 3,
    "evaluation": 4, "train": 4,
    "api": 5, "plugin_api": 5, "ops": 5,
    "cli": 6,
    "__init__": 7,
}
ENGINE_THIRD_PARTY = {"numpy"}   # what engine/ may import at module level besides the standard library and _C


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(path: Path, name: str = None):
    """(imported osengine module, line, at module level) for every import in the file (module `name`, by default
    the one at `path`); `from X import name` counts as importing X.name when that is a module of the package, else X."""
    name = name or module_name(path)
    package = name if is_package(path) else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                candidate = f"{origin}.{alias.name}"
                targets.append(candidate if module_path(candidate) is not None else origin)
        for target in targets:
            if target == "osengine" or target.startswith("osengine."):
                yield target, node.lineno, id(node) in top_level


def module_path(module: str):
    if module == "osengine":
        return PACKAGE / "__init__.py"
    rel = Path(*module.split(".")[1:])
    for candidate in (PACKAGE / rel.with_suffix(".py"), PACKAGE / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    if module.endswith("._C"):
        return PACKAGE / "_C.pyi"
    return None


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_room_has_a_layer():
    rooms = {room(module_name(p)) for p in SOURCES}
    assert rooms <= set(LAYERS), f"rooms without a layer in docs/architecture.md and LAYERS: {rooms - set(LAYERS)}"


def layer_violations(path: Path, name: str = None) -> list:
    here = room(name or module_name(path))
    found = []
    for target, line, _ in imports(path, name):
        there = room(target)
        if there != here and LAYERS[there] >= LAYERS[here]:
            found.append(f"{path.name}:{line} imports {target}: room '{here}' (layer {LAYERS[here]}) may import only "
                         f"lower layers, but '{there}' is layer {LAYERS[there]}")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_or_stay_in_the_room(path):
    assert layer_violations(path) == []


def test_no_import_cycles():
    graph = {module_name(p): sorted({t for t, _, _ in imports(p) if module_path(t) is not None} - {module_name(p)})
             for p in SOURCES}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start)


@pytest.mark.parametrize("path", sorted((PACKAGE / "engine").rglob("*.py")), ids=lambda p: p.name)
def test_engine_room_needs_numpy_and_the_extension_only(path):
    stdlib = set(sys.stdlib_module_names)
    tree = ast.parse(path.read_text())
    for node in tree.body:  # module level: what `import osengine` pulls in
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        for name in names:
            top = name.split(".")[0]
            assert top in stdlib or top in ENGINE_THIRD_PARTY, f"{path.name}:{node.lineno} imports {name}"


def test_the_checks_see_a_violation(tmp_path):
    """A quant module importing the runtime (relatively, inside a function) and a lower room imported by a higher
    one are told apart."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ..runtime.linear import EngineLinear\n    return EngineLinear\n")
    assert any("may import only lower layers" in v for v in layer_violations(bad, "osengine.quant.bad"))
    good = tmp_path / "good.py"
    good.write_text("from ..quant.spec import QuantSpec\nfrom .linear import EngineLinear\n")
    assert layer_violations(good, "osengine.runtime.good") == []
    assert {t for t, _, _ in imports(good, "osengine.runtime.good")} == {"osengine.quant.spec",
                                                                          "osengine.runtime.linear"}

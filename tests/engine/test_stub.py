"""python/osengine/_C.pyi against the compiled bindings: the same functions, classes, methods and properties, each
function with the same argument names in the same order and defaults in the same places (pybind11 writes every
binding's signature on the first line of its docstring)."""
import ast
import re
from pathlib import Path

import pytest

import osengine._C as C

STUB = Path(__file__).resolve().parents[2] / "python" / "osengine" / "_C.pyi"
SIGNATURE = re.compile(r"^(?P<name>\w+)\((?P<args>.*)\) -> .*$")


def split_arguments(text: str) -> list:
    """Top-level comma split of a pybind11 argument list (types may hold brackets and commas)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def bound_arguments(obj) -> list:
    """[(name, has default)] from a pybind11 docstring; `self` dropped for methods."""
    first = (obj.__doc__ or "").strip().split("\n")[0]
    match = SIGNATURE.match(first)
    assert match, f"no pybind11 signature in the docstring of {obj!r}: {first!r}"
    out = []
    for part in split_arguments(match["args"]):
        name = part.split(":")[0].strip()
        if name != "self":
            out.append((name, "=" in part))
    return out


def stub_arguments(node: ast.FunctionDef) -> list:
    args = [a.arg for a in node.args.args if a.arg != "self"]
    with_default = len(node.args.defaults)
    out = [(name, i >= len(args) - with_default) for i, name in enumerate(args)]
    if node.args.kwonlyargs:  # pybind11 writes keyword-only arguments after a bare '*'
        out.append(("*", False))
        out += [(a.arg, d is not None) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults)]
    return out


def stub_tree():
    return ast.parse(STUB.read_text())


def stub_functions():
    return {n.name: n for n in stub_tree().body if isinstance(n, ast.FunctionDef)}


def stub_class(name):
    return next(n for n in stub_tree().body if isinstance(n, ast.ClassDef) and n.name == name)


def compiled_names():
    return {n for n in dir(C) if not n.startswith("_")}


def test_the_stub_names_what_the_extension_has():
    stub = set(stub_functions()) | {n.name for n in stub_tree().body if isinstance(n, ast.ClassDef)}
    assert stub == compiled_names(), (f"missing from _C.pyi: {sorted(compiled_names() - stub)}; "
                                      f"not in the extension: {sorted(stub - compiled_names())}")


@pytest.mark.parametrize("name", sorted(n for n in dir(C) if not n.startswith("_") and callable(getattr(C, n))
                                        and not isinstance(getattr(C, n), type)))
def test_function_signatures_match(name):
    assert stub_arguments(stub_functions()[name]) == bound_arguments(getattr(C, name))


@pytest.mark.parametrize("name", sorted(n.name for n in stub_tree().body if isinstance(n, ast.ClassDef)))
def test_class_members_match(name):
    stub = stub_class(name)
    methods = {n.name: n for n in stub.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    properties = {n for n, f in methods.items() if any(getattr(d, "id", None) == "property" for d in f.decorator_list)}
    compiled = {n: v for n, v in vars(getattr(C, name)).items() if not n.startswith("_")}
    assert set(methods) == set(compiled)
    assert properties == {n for n, v in compiled.items() if isinstance(v, property)}
    for n, v in compiled.items():
        if n not in properties:
            function = v.__func__ if isinstance(v, staticmethod) else v
            assert stub_arguments(methods[n]) == bound_arguments(function), n


def test_a_drifted_stub_is_caught():
    """The comparison sees a missing argument (the drift that once left `stream` out of the stub)."""
    node = ast.parse("def gemm_accumulate(a, weights, out, a_format): ...").body[0]
    assert stub_arguments(node) != bound_arguments(C.gemm_accumulate)

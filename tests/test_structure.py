"""The package's shape: no import circle, no private name used outside its module,
no module over ~500 lines (exceptions named, with the reason)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "autoalign"

#: Modules allowed over the line budget, and why.
LONG_MODULES: dict[str, str] = {}
MAX_LINES = 500


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(folder.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(module: str, path: pathlib.Path, known: set[str]) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import, lazy ones included."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    out.append((sub, None, node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((alias.name, None, node.lineno) for alias in node.names)
    return out


def _import_graph() -> dict[str, set[str]]:
    mods = _modules(PACKAGE)
    graph = {}
    for name, path in mods.items():
        deps = set()
        for target, _, _ in _imports(name, path, set(mods)):
            # importing a submodule runs its package's __init__ first, but that is not a use of it
            if target in mods and target != name and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_the_aligner_registry_is_a_leaf_of_the_pipeline():
    graph = _import_graph()
    seen, todo = set(), ["autoalign.aligners.registry"]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    assert not seen & {"autoalign.merge", "autoalign.schemes", "autoalign.stages", "autoalign.select"}


def _private_uses(folder: pathlib.Path, known: set[str]) -> list[str]:
    """``from x import _name`` and ``module._name`` where the module is one of ours."""
    bad = []
    for name, path in _modules(folder).items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}
        for target, imported, line in _imports(name, path, known):
            if imported and imported.startswith("_") and not imported.startswith("__") and target in known and target != name:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{imported}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in known:
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node.level, node.module)
                for a in node.names:
                    if f"{target}.{a.name}" in known:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                dotted = []
                while isinstance(base, ast.Attribute):
                    dotted.append(base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and base.id in aliases:
                    owner = ".".join([aliases[base.id]] + dotted[::-1])
                    if owner in known and owner != name:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {owner}.{node.attr}")
    return bad


@pytest.mark.parametrize("folder", ["autoalign", "benchmarks", "tests"])
def test_no_private_name_is_used_outside_its_module(folder):
    known = set(_modules(PACKAGE)) | set(_modules(ROOT / "benchmarks"))
    assert _private_uses(ROOT / folder, known) == []


def test_the_private_name_check_can_fail(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("_hidden = 1\n")
    (pkg / "b.py").write_text("from .a import _hidden\nfrom . import a\nx = a._hidden\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert len(_private_uses(pkg, {"pkg", "pkg.a", "pkg.b"})) == 2


def test_no_module_over_the_line_budget():
    long = {
        name: n
        for name, path in _modules(PACKAGE).items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONG_MODULES
    }
    assert long == {}

"""The package dependency graph: no cycles, and only the imports docs/architecture.md allows."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "edgellm"
WIRING = {"app", "cli", "__main__"}


def allowed() -> dict[str, set[str]]:
    """The module map's table: package -> what it may import (packages, or package.module)."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `([\w.]+)` \| ([^|]*) \|$", doc, re.M)
    return {name: {x.strip() for x in targets.split(",") if x.strip() not in ("", "—")} for name, targets in rows}


def imports() -> dict[str, set[str]]:
    """Each package's (or top-level module's) imports of edgellm modules, function-level ones included."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        importer = parts[1] if len(parts) > 1 and parts[1] != "__init__" else "edgellm"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "edgellm":
                names = [node.module] if node.module != "edgellm" else []
                for alias in node.names:  # `from edgellm.engine import loader` imports the module engine.loader
                    if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").exists():
                        names.append(f"{node.module}.{alias.name}")
                    elif node.module == "edgellm":
                        names.append(f"edgellm.{alias.name}" if (PACKAGE / alias.name).is_dir() or
                                     (PACKAGE / f"{alias.name}.py").exists() else "edgellm")
                found.setdefault(importer, set()).update(n.removeprefix("edgellm.") if n != "edgellm" else n
                                                         for n in names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "edgellm":
                        found.setdefault(importer, set()).add(alias.name.removeprefix("edgellm.") or "edgellm")
    return found


def package_of(module: str) -> str:
    return module.split(".")[0]


def violations(found: dict[str, set[str]], rules: dict[str, set[str]]) -> list[str]:
    problems = []
    for importer, modules in sorted(found.items()):
        if importer in WIRING:
            continue
        if importer not in rules:
            problems.append(f"{importer} is not in the module map")
            continue
        for module in sorted(modules):
            target = package_of(module)
            ok = target == importer or target in rules[importer] or any(
                module == rule or module.startswith(rule + ".") for rule in rules[importer])
            if not ok:
                problems.append(f"{importer} imports {module}, which the module map does not allow")
    return problems


def cycles(found: dict[str, set[str]]) -> list[list[str]]:
    graph = {p: {package_of(m) for m in ms} - {p} for p, ms in found.items()}
    seen: set[str] = set()
    loops = []

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            loops.append(path[path.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])

    for node in sorted(graph):
        visit(node, [])
    return loops


def test_imports_follow_the_module_map():
    assert violations(imports(), allowed()) == []


def test_packages_import_each_other_in_no_cycle():
    assert cycles(imports()) == []


def test_the_checks_catch_what_they_are_for():
    rules = {"engine": {"store"}, "store": set(), "serving": {"engine.service"}}
    assert violations({"store": {"engine.pool"}}, rules) == [
        "store imports engine.pool, which the module map does not allow"]
    assert violations({"serving": {"engine.runner"}}, rules) == [
        "serving imports engine.runner, which the module map does not allow"]
    assert violations({"serving": {"engine.service"}, "engine": {"store.registry"}}, rules) == []
    assert cycles({"engine": {"store.registry"}, "store": {"engine.gguf"}}) == [["engine", "store", "engine"]]

"""The package's modules import in one direction: no two modules import each other (a module-level or a
function-level import alike), so each can be read and tested from the bottom up."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "flap_llm"


def _module_names() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = f"{base}.{node.module}" if node.module else base
            subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
            found |= subs or ({target} & set(modules))  # `from . import x` imports the submodule x only
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & set(modules)
    return found - {name}


def test_no_two_modules_import_each_other():
    modules = _module_names()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert "flap_llm.config" in graph and "flap_llm.methods.registry" in graph["flap_llm.engine"]
    # the config asks the registry, and imports no method's module (their options flow down to them)
    assert {m for m in graph["flap_llm.config"] if m.startswith("flap_llm.methods")} <= {
        "flap_llm.methods", "flap_llm.methods.registry", "flap_llm.methods.base"}
    assert not {m for m in graph["flap_llm.methods.registry"] if not m.startswith("flap_llm.methods")} - {
        "flap_llm.errors"}
    pairs = [(a, b) for a, b in itertools.combinations(sorted(graph), 2) if b in graph[a] and a in graph[b]]
    assert pairs == []


# Where a method's name may appear outside methods/: the compatibility module (0.1's keywords), the package's
# public re-exports, and nowhere else. Everything else asks the registry.
NAMING_ALLOWED = {"flap_llm", "flap_llm.compat"}
METHOD_NAMES = ('"obs"', "'obs'", '"wanda-sp"', "'wanda-sp'", '"mag-sp"', "'mag-sp'", '"depth"', "'depth'",
                "ObsOptions", "FlapOptions")


def test_no_module_outside_methods_names_a_method():
    named = {}
    for name, path in _module_names().items():
        if name.startswith("flap_llm.methods") or name in NAMING_ALLOWED:
            continue
        text = path.read_text()
        hits = [w for w in METHOD_NAMES if w in text]
        if hits:
            named[name] = hits
    assert named == {}

"""The dependency direction of DESIGN.md, checked on the import graph read from the source (never by importing):
which package may import which, no import cycles, and no torch on the MCP side."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("agent_runtime", "inference", "policies", "transports")

# Layers inside agent_runtime, lowest first: a module may import its own layer and the ones below.
LAYERS = ("config", "tools", "agents", "server", "cli")
# Leaf modules every layer shares; they import nothing of agent_runtime themselves.
SHARED = ("agent_runtime.errors", "agent_runtime.logging")
# What each top-level package may import besides itself.
ALLOWED = {
    "agent_runtime": {"agent_runtime", "inference", "policies", "transports"},
    "inference": {"inference"},  # knows nothing of MCP, policies or agents
    "policies": {"policies"},  # pure decisions
    "transports": {"transports"},  # knows nothing of policies, agents, models
}
# Layers that may use the engine; `tools` and `config` never do (`agent-runtime tools ...` must not load torch).
MAY_USE_INFERENCE = {"agents", "server", "cli"}
TORCH = ("torch", "transformers", "xgrammar", "triton")


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (or package.name for `from package import name`)
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`
    top_level: bool  # at module level (not inside a function)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[Import]:
    source = _module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, True, top_level)
                for stmt in child.orelse:
                    visit_stmt(stmt, type_only, top_level)
                continue
            visit_stmt(child, type_only, top_level)

    def visit_stmt(node: ast.AST, type_only: bool, top_level: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(source, alias.name, node.lineno, type_only, top_level))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.append(Import(source, f"{base}.{alias.name}", node.lineno, type_only, top_level))
        else:
            inner = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(node, type_only, top_level and not inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False, True)
    return found


def _all_imports() -> list[Import]:
    out: list[Import] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out.extend(_imports(path))
    return out


def _known_modules() -> set[str]:
    return {_module_name(p) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _resolve(target: str, known: set[str]) -> str | None:
    """The project module `target` names (`pkg.mod.Name` -> `pkg.mod`), or None for third-party names."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "agent_runtime" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return parts[1]


IMPORTS = _all_imports()
KNOWN = _known_modules()


def test_the_graph_is_real() -> None:
    sources = {i.source for i in IMPORTS}
    assert {"agent_runtime.tools.executor", "inference.engine", "transports.stdio"} <= sources
    assert any(i.target.startswith("agent_runtime.config") for i in IMPORTS if i.source.endswith("executor"))


def test_packages_import_only_what_the_design_allows() -> None:
    bad = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in IMPORTS
        if i.target.split(".")[0] in PACKAGES
        and i.target.split(".")[0] not in ALLOWED[i.source.split(".")[0]]
    ]
    assert not bad, "\n".join(bad)


def test_agent_runtime_layers_import_downwards_only() -> None:
    bad = []
    for i in IMPORTS:
        src_layer, target = _layer(i.source), _resolve(i.target, KNOWN)
        if target is None:
            continue
        if i.source in SHARED and target.startswith("agent_runtime"):
            bad.append(f"{i.source}:{i.line} (a shared leaf) imports {target}")
        if src_layer is None:
            continue
        dst_layer = _layer(target)
        if dst_layer is not None and LAYERS.index(dst_layer) > LAYERS.index(src_layer):
            bad.append(f"{i.source}:{i.line} ({src_layer}) imports {target} ({dst_layer})")
        if target.startswith("inference") and src_layer not in MAY_USE_INFERENCE:
            bad.append(f"{i.source}:{i.line} ({src_layer}) imports the engine: {target}")
        if target == "agent_runtime" and not i.type_only and i.target != "agent_runtime.__version__":
            bad.append(f"{i.source}:{i.line} imports the public API package from inside (import the module)")
    assert not bad, "\n".join(bad)


def test_the_mcp_side_never_imports_torch() -> None:
    mcp_side = ("agent_runtime.config", "agent_runtime.tools", "policies", "transports")
    bad = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in IMPORTS
        if i.source.startswith(mcp_side) and i.target.split(".")[0] in TORCH
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    """Runtime imports (TYPE_CHECKING ones excluded, function-level ones included: a cycle hidden inside a
    function is still a cycle in the design) form a DAG between project modules."""
    graph: dict[str, set[str]] = {m: set() for m in KNOWN}
    for i in IMPORTS:
        target = _resolve(i.target, KNOWN)
        # `agent_runtime/__init__` lists the public API for type checkers only; packages import their
        # submodules' names through their __init__, which is not a dependency of the submodule itself.
        if target is None or i.type_only or target == i.source or i.source == "agent_runtime":
            continue
        if i.source.startswith(f"{target}."):
            continue  # a module importing its own package's __init__ (e.g. `from inference import envs`)
        graph[i.source].add(target)
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return [*stack[stack.index(nxt) :], nxt]
            if colour[nxt] == WHITE:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("layer", LAYERS)
def test_each_package_says_what_it_owns_and_may_import(layer: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / "agent_runtime" / layer / "__init__.py").read_text()))
    assert doc and "import" in doc, (
        f"agent_runtime/{layer}/__init__.py needs a docstring saying what it may import"
    )

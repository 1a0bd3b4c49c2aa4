"""No import cycles between scalesgd's modules: every module under src/scalesgd is parsed (not imported) and
its top-level imports of scalesgd modules are the edges of a graph, which must have no cycle. Imports inside
functions are deferred and do not make cycles at import time; they are parsed too, so a module that only
exists in a function-level import is still checked to exist."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import scalesgd

ROOT = Path(scalesgd.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> tuple[set[str], set[str]]:
    """(top-level, function-level) scalesgd modules that ``path`` imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top: set[str] = set()
    nested: set[str] = set()

    def targets(node) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names}
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        # `from scalesgd import comm` imports the module scalesgd.comm; `from scalesgd.comm import X` the module
        return {f"{base}.{a.name}" for a in node.names} | {base}

    def type_checking_only(node) -> bool:  # `if TYPE_CHECKING:` never runs, so its imports make no cycle
        test = getattr(node, "test", None)
        return isinstance(node, ast.If) and (
            (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (nested if in_function else top).update(t for t in targets(child) if t.split(".")[0] == "scalesgd")
            visit(child, in_function or type_checking_only(child)
                  or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, nested


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    edges, deferred = {}, {}
    for name, path in files.items():
        top, nested = _imports(path, name)
        edges[name] = {t for t in top if t in files and t != name}
        deferred[name] = {t for t in nested if t in files}
    return edges, deferred


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles_between_scalesgd_modules():
    edges, _ = _graph()
    assert "scalesgd.comm" in edges and "scalesgd.ring_schedule" in edges["scalesgd.comm"]
    cycles = _cycles(edges)
    assert not cycles, "import cycles (top-level imports): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_ring_transports_share_the_schedule_not_each_other():
    edges, deferred = _graph()
    assert "scalesgd.comm" not in edges["scalesgd.tcp_comm"] | deferred["scalesgd.tcp_comm"]
    assert "scalesgd.tcp_comm" not in edges["scalesgd.comm"] | deferred["scalesgd.comm"]
    assert "scalesgd.ring_schedule" in edges["scalesgd.tcp_comm"]


@pytest.mark.spawn
def test_the_command_line_checks_comm_names_without_torch():
    import subprocess
    import sys

    code = ("import sys; import scalesgd.comm_registry as r; import scalesgd.ring_schedule; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(r.COMM_NAMES)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

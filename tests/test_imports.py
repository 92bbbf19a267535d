"""The package's import graph: no module in `explorer` imports one that imports it back (at
any depth, function-level imports included), and the layers point one way: analysis knows
nothing of the UI, and only the UI imports gradio."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "explorer"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The `explorer` modules ``path`` imports, anywhere in it. ``from package import name``
    counts as an import of the submodule ``package.name`` when there is one, else of the
    package; importing ``a.b`` is not counted as importing ``a`` (Python runs ``a/__init__``
    first, but that is the package's own business, not an arrow of this module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_at_any_depth():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_resolution_by_hand(tmp_path, monkeypatch):
    """``from explorer.ui import common`` is the module ``explorer.ui.common``; ``from
    explorer.attention import capture`` names a function of the package: the package."""
    known = {"explorer.ui.common", "explorer.ui", "explorer.attention", "explorer.plots.lab"}
    path = tmp_path / "sample.py"
    path.write_text("from explorer.ui import common\nfrom explorer.attention import capture\n"
                    "def f():\n    import explorer.plots.lab\n")
    monkeypatch.setattr(__import__(__name__), "module_name", lambda p: "explorer.sample")
    assert imports(path, known) == {"explorer.ui.common", "explorer.attention",
                                    "explorer.plots.lab"}


def test_no_module_imports_one_that_imports_it_back():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_analysis_never_imports_the_ui():
    """Only `explorer.ui` imports `explorer.ui` (besides `app.py`, and the benchmarks, which
    call the app's endpoints like a client); `explorer.plots` builds figures from analysis
    results, so it imports neither the UI nor gradio."""
    upward = [f"{name} -> {target}" for name, targets in graph().items()
              if not name.startswith(("explorer.ui", "explorer.bench")) for target in targets
              if target.startswith("explorer.ui")]
    assert not upward, upward


@pytest.mark.parametrize("name", sorted(n for n in modules() if not n.startswith("explorer.ui")))
def test_only_the_ui_imports_gradio(name):
    tree = ast.parse(modules()[name].read_text())
    gradio = [node.lineno for node in ast.walk(tree)
              if (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "gradio"
                                                       for a in node.names))
              or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gradio")]
    allowed = name.startswith("explorer.bench")  # benchmarks drive the app like a client
    assert allowed or not gradio, f"{name} imports gradio at lines {gradio}"

"""The package's import graph stays one-way: no cycles, and no subpackage reaches into a
sibling's private module."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "poplds"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> poplds modules it imports (module level and inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        mod = _module(path)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("poplds"):
                    deps.add(target)
                    deps.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("poplds"))
        known = {_module(p) for p in PKG.rglob("*.py")}
        graph[mod] = {d for d in deps if d in known and d != mod}
    return graph


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            # a package's __init__ importing its own modules is the one allowed direction
            if m.startswith(d + ".") and d in graph:
                continue
            if state.get(d) == 1:
                raise AssertionError(" -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_reach_into_a_siblings_private_module():
    for mod, deps in _imports().items():
        for d in deps:
            private = [p for p in d.split(".")[1:] if p.startswith("_") and p != "__init__"]
            if not private:
                continue
            owner = d.rsplit(".", 1)[0]  # the package the private module belongs to
            top_level = owner == "poplds"  # poplds._errors etc. are shared by everyone
            assert top_level or mod.startswith(owner + ".") or mod == owner, f"{mod} imports {d}"


def test_what_the_snakefile_imports_is_light():
    """The Snakefile imports ``poplds._outputs`` (the model list) at parse time, on every run
    and in every cluster job: it loads none of the heavy dependencies."""
    import subprocess
    import sys

    code = (
        "import sys, poplds._outputs; "
        "print(sorted(m for m in ('numpy', 'zarr', 'dask', 'torch', 'pynwb') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

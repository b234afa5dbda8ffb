"""Architecture contracts: the engine's layering, its independence from napari/Qt, and no import cycles.

Layer order of ``pfmseg_engine`` (a package imports only packages below it; ``a | b`` are independent
siblings that never import each other). The contracts live in ``pyproject.toml`` ``[tool.importlinter]``;
this order is theirs:

    __main__ > cli > commands                 front ends: flags and printing
    > distributed > demo                      the cluster task and the demo: adapters that run jobs
    > jobs > live                             one job per workflow; the live loop's feature store and worker
    > compare > training                      workflows' parts: comparison, fine-tuning (its validation
                                              predicts images with ``inference``)
    > inference                               plan, execute and export slide predictions
    > slides > annotations                    slide readers and tissue; QuPath GeoJSON, rasterisers, ROIs
    > checkpoint > benchmarking > model > unet > heads | tuning > backbones
                                              the model floor: saved models, the model and its parts
    > data | labelstore                       training data; the OME-Zarr label store
    > metrics | training_scale | classes | colors | csvsafe | devices | limits | paths | storage
    > errors > _lazy                          leaves, each below every user

``napari_pfmseg`` sits above all of it and the engine never imports the plugin, napari or Qt.
Imports inside functions count (that is where cycles used to hide); imports under ``if TYPE_CHECKING:``
are annotations only and do not.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
PACKAGES = ("pfmseg_engine", "napari_pfmseg")


def _source_root() -> Path:
    spec = importlib.util.find_spec("pfmseg_engine")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).resolve().parents[1]


def _modules(src: Path, packages: Iterable[str]) -> dict[str, Path]:
    mods = {}
    for package in packages:
        for path in sorted((src / package).rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def _imported_names(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]


def import_graph(src: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """module -> the modules of ``packages`` it imports anywhere (functions included, TYPE_CHECKING not)."""
    mods = _modules(src, packages)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skipped:
                continue
            for name in _imported_names(module, path, node):
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                # a package's own __init__ is not a dependency of its submodules
                if name and name != module and not module.startswith(name + "."):
                    graph[module].add(name)
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def package_graph(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed to first-level subpackages (``pfmseg_engine.X``)."""
    def top(name: str) -> str:
        return ".".join(name.split(".")[:2])

    collapsed: dict[str, set[str]] = {}
    for module, deps in graph.items():
        collapsed.setdefault(top(module), set()).update(top(d) for d in deps if top(d) != top(module))
    return collapsed


def test_no_module_import_cycles():
    graph = import_graph(_source_root(), PACKAGES)
    assert len(graph) > 100  # the whole source tree was read
    assert cycles(graph) == []


def test_no_package_import_cycles():
    assert cycles(package_graph(import_graph(_source_root(), PACKAGES))) == []


def test_the_cycle_check_sees_function_level_imports_and_skips_type_checking(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("def f():\n    from . import a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    (package / "d.py").write_text("from .c import y\n")
    (package / "e.py").write_text("from pkg import d\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.c"] == set() and graph["pkg.e"] == {"pkg.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    (package / "c.py").write_text("from .e import z\n")
    assert cycles(graph := import_graph(tmp_path, ["pkg"])) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d", "pkg.e"]]


def test_the_package_check_sees_cycles_between_subpackages(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / "pkg" / sub).mkdir(parents=True)
        (tmp_path / "pkg" / sub / "__init__.py").write_text("")
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "x" / "m.py").write_text("from ..y.n import f\n")
    (tmp_path / "pkg" / "y" / "n.py").write_text("def f():\n    from ..x import g\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert cycles(graph) == []  # module by module there is none
    assert cycles(package_graph(graph)) == [["pkg.x", "pkg.y"]]


def test_import_contracts_are_kept():
    """import-linter's layer and forbidden-import contracts of ``pyproject.toml`` (see the module docstring).

    Run in a child process: import-linter configures logging with ``dictConfig``, which disables every logger
    that exists at that moment, and would silence the engine's log records for the tests that follow."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_source_root()),
                                                                        os.environ.get("PYTHONPATH")]))}
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(PYPROJECT)!r}, no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout

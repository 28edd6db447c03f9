"""Static checks on umig's own import graph: no cycles, no plugins by name, one-way layers.

The project's source is read with :mod:`ast` only; nothing under ``umig`` is imported.
Imports inside ``if TYPE_CHECKING:`` blocks are type-only and are skipped.
"""

from __future__ import annotations

import ast
import itertools
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> installed package name (see [tool.setuptools.package-dir] in pyproject.toml).
SOURCE_DIRS: dict[str, str] = {"umig": "umig", "cli": "umig.cli", "unlearners": "umig.unlearners"}
EXCLUDED_PARTS = frozenset({"tests", "examples", "benchmarks", ".venv", "build", "__pycache__"})
OLD_TOP_LEVEL_NAMES = frozenset({"cli", "unlearners"})  # now umig.cli and umig.unlearners
PLUGIN_PACKAGE = "umig.unlearners"

# The only imports allowed inside a function body ("x" also covers "x.*").
DEFERRABLE_IMPORTS: frozenset[str] = frozenset({
    # Optional extras or integrations: absent from a base install, so a module-level import
    # would break `import umig` for everyone who did not ask for them.
    "matplotlib", "ray", "flwr", "lightning", "pytorch_lightning", "mlflow", "huggingface_hub",
    "fsspec", "s3fs", "botocore", "sqlalchemy", "psycopg", "psycopg2", "pgserver", "moto", "boto3",
    "uvicorn", "starlette", "fastapi", "playwright", "PIL",
    # Slow to import and needed on one code path only (data sets, pretrained architectures,
    # numpy-side safetensors files, live progress bars).
    "sklearn", "torchvision", "scipy", "safetensors.numpy", "rich.progress",
    # Worker and formatting plumbing used only when a backend starts processes or a table
    # prints a timestamp.
    "torch.multiprocessing", "socket", "datetime",
})

# Lowest layer first; a module may import only its own layer or lower ones. "x.*" covers x and
# everything under it. The package `umig` re-exports the facade, so it sits with it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("umig.errors",)),
    ("foundations", ("umig.graph", "umig.fisher", "umig.blobs", "umig.delta", "umig.heads",
                     "umig.arch", "umig.models", "umig.data", "umig.train", "umig.evaluate",
                     "umig.forget")),
    ("store", ("umig.db", "umig.store")),  # db: connections and dialects, used by the store only
    ("ingest", ("umig.ingest",)),
    ("execution", ("umig.execution", "umig.unlearner")),
    ("unlearning", ("umig.unlearning", "umig.unlearners.*")),
    ("services", ("umig.lineage", "umig.verify", "umig.requests", "umig.attribution")),
    ("facade", ("umig", "umig.api", "umig.demo", "umig.integrations.*")),
    ("frontends", ("umig.cli.*", "umig.ui.*")),
]
DEFAULT_LAYER = [name for name, _ in LAYERS].index("facade")  # anything under umig not listed


@dataclass(frozen=True)
class ImportRef:
    source: str  # importing module
    target: str  # absolute name: a project module where one matches, else the module as written
    member: str | None  # `c` in `from a.b import c` when a.b.c is not a project module
    where: str  # path:line, relative to the scanned root
    in_function: bool


def module_name(rel: Path) -> str:
    """`cli/main.py` -> `umig.cli.main`; `unlearners/__init__.py` -> `umig.unlearners`."""
    parts = [SOURCE_DIRS[rel.parts[0]], *rel.parts[1:-1]]
    if rel.name != "__init__.py":
        parts.append(rel.stem)
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    paths = [path for folder in SOURCE_DIRS for path in sorted((root / folder).rglob("*.py"))]
    return {module_name(path.relative_to(root)): path for path in paths
            if not EXCLUDED_PARTS.intersection(path.relative_to(root).parts)}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


ImportNode = ast.Import | ast.ImportFrom


def _import_nodes(nodes: Iterable[ast.AST], in_function: bool) -> Iterator[tuple[ImportNode, bool]]:
    """Every import statement under nodes, with whether it sits in a function body."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.orelse, in_function)
        else:
            nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            yield from _import_nodes(ast.iter_child_nodes(node), nested)


def _project_or_self(name: str, modules: dict[str, Path]) -> str:
    """The longest project module that name lies under, else name itself (third-party)."""
    return max((m for m in modules if _under(name, m)), key=len, default=name)


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, root: Path, modules: dict[str, Path]) -> list[ImportRef]:
    rel = path.relative_to(root).as_posix()
    refs: list[ImportRef] = []
    for node, in_function in _import_nodes(ast.parse(path.read_text(), str(path)).body, False):
        where = f"{rel}:{node.lineno}"
        if isinstance(node, ast.Import):
            refs += [ImportRef(module, _project_or_self(a.name, modules), None, where, in_function)
                     for a in node.names]
        elif node.module != "__future__":
            base = _resolve_from(module, path.name == "__init__.py", node)
            for alias in node.names:
                if (sub := f"{base}.{alias.name}") in modules:  # `c` is a submodule
                    refs.append(ImportRef(module, sub, None, where, in_function))
                else:
                    target = _project_or_self(base, modules)
                    refs.append(ImportRef(module, target, alias.name, where, in_function))
    return refs


@lru_cache(maxsize=None)
def scan(root: Path) -> tuple[dict[str, Path], list[ImportRef]]:
    modules = project_modules(root)
    refs = [ref for name, path in modules.items() for ref in imports_of(name, path, root, modules)]
    return modules, refs


def import_graph(modules: dict[str, Path], refs: Iterable[ImportRef]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for ref in refs:
        # Keep the first place an edge is seen; a package importing itself is no edge.
        edge = (ref.source, ref.target)
        if ref.target in modules and ref.target != ref.source and not graph.has_edge(*edge):
            graph.add_edge(ref.source, ref.target, where=ref.where)
    return graph


def cycles(graph: nx.DiGraph, cap: int = 10_000) -> list[list[str]]:
    """Every simple cycle (up to cap), each rotated to start at its smallest name, shortest first."""
    found = [c[c.index(min(c)):] + c[: c.index(min(c))]
             for c in itertools.islice(nx.simple_cycles(graph), cap)]
    return sorted(found, key=lambda c: (len(c), c))


def layer_of(module: str) -> int:
    for index, (_, names) in enumerate(LAYERS):
        if module in names:
            return index
    matches = [(len(pattern), index) for index, (_, names) in enumerate(LAYERS)
               for pattern in names if pattern.endswith(".*") and _under(module, pattern[:-2])]
    return max(matches)[1] if matches else DEFAULT_LAYER


def _deferrable(name: str) -> bool:
    return any(_under(name, ok) for ok in DEFERRABLE_IMPORTS)


def _report(lines: Iterable[str]) -> str:
    return "\n".join(dict.fromkeys(lines))  # one line per import statement and target


def test_no_import_cycle() -> None:
    modules, refs = scan(ROOT)
    graph = import_graph(modules, refs)
    found = cycles(graph)
    report = [" -> ".join(f"{a} ({graph.edges[a, b]['where']})" for a, b in zip(c, c[1:] + c[:1]))
              for c in found[:10]]
    assert not found, f"{len(found)} import cycle(s), first {len(report)}:\n" + "\n".join(report)


def test_core_does_not_import_plugins_by_name() -> None:
    _, refs = scan(ROOT)
    bad = [f"{r.where}: {r.source} imports old top-level name {r.target}" for r in refs
           if r.target.split(".")[0] in OLD_TOP_LEVEL_NAMES]
    bad += [f"{r.where}: {r.source} imports plugin module {r.target}" for r in refs
            if _under(r.target, PLUGIN_PACKAGE) and not _under(r.source, PLUGIN_PACKAGE)
            and not _under(r.source, "umig.cli")]
    assert not bad, _report(bad)


def test_lower_layers_do_not_import_upper() -> None:
    modules, refs = scan(ROOT)
    bad = [f"{r.where}: {r.source} [{LAYERS[layer_of(r.source)][0]}] imports "
           f"{r.target} [{LAYERS[layer_of(r.target)][0]}]" for r in refs
           if r.target in modules and layer_of(r.target) > layer_of(r.source)]
    assert not bad, _report(bad)


def deferral_problem(ref: ImportRef, modules: dict[str, Path]) -> str | None:
    """Why a function-level import is not allowed, or None when it is."""
    if ref.target in modules:
        return "project module"
    if _deferrable(ref.target) or (ref.member and _deferrable(f"{ref.target}.{ref.member}")):
        return None
    return "not in DEFERRABLE_IMPORTS"


def test_function_level_imports_only_defer_heavy_dependencies() -> None:
    modules, refs = scan(ROOT)
    bad = [f"{r.where}: {r.source} imports {r.target} ({problem})" for r in refs
           if r.in_function and (problem := deferral_problem(r, modules))]
    assert not bad, _report(bad)


def test_walker_finds_a_planted_cycle(tmp_path: Path) -> None:
    package = tmp_path / "umig"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from umig import b\nfrom umig.c import X\n")
    (package / "b.py").write_text("def f() -> None:\n    from . import a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    import umig.a\nX = 1\n")
    modules, refs = scan(tmp_path)
    graph = import_graph(modules, refs)
    assert cycles(graph) == [["umig.a", "umig.b"]]
    assert graph.edges["umig.b", "umig.a"]["where"] == "umig/b.py:2"
    assert [r.in_function for r in refs if r.source == "umig.b"] == [True]


def test_every_package_folder_is_in_the_wheel() -> None:
    # setuptools' explicit `packages` list must name every package under umig/, or the wheel lacks it.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"umig." + ".".join(p.parent.relative_to(ROOT / "umig").parts)
             for p in (ROOT / "umig").rglob("__init__.py") if p.parent != ROOT / "umig"}
    assert found <= listed, f"packages missing from pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"

"""The import graph of the ``rexec`` package: no cycles, and the planes share only schemas.

grimp (import-linter's engine) builds the graph from the package on disk; it follows the links
in ``rexec/`` to the top-level folders (the first test checks that it saw every module).

- No import cycles among product modules. An edge is an import at module level, those under
  ``if TYPE_CHECKING:`` included (mypy follows them, and a cycle of them is one plain import
  away from a real one); an import inside a function (``rexec serve`` reaching into the
  dispatcher from the CLI) is left out, since it runs after both modules loaded. grimp does
  not tell where an import stands (its ``is_lazy`` is PEP 810's ``lazy import``), so the lines
  of the imports inside functions come from ``ast``.
- ``rexec.dispatcher`` and ``rexec.worker`` never import each other, nor the worker the client:
  the two planes share only ``rexec.schemas``. ``rexec.schemas`` imports none of the other three.
  ``rexec.airflow``'s executor is a client and its runner task code; none of rexec imports it.
  Here every import counts, in a function too, directly or through other modules.
"""

from __future__ import annotations

import ast
import itertools
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import grimp
import pytest

import rexec

ROOT = "rexec"
PACKAGE_DIR = Path(rexec.__file__).parent
SUBPACKAGES = ("rexec.airflow", "rexec.client", "rexec.dispatcher", "rexec.schemas", "rexec.worker")

Edge = tuple[str, str]


@cache
def full_graph() -> grimp.ImportGraph:
    """Every import of the package, wherever it stands."""
    return grimp.build_graph(ROOT, cache_dir=None)


@cache
def eager_graph() -> grimp.ImportGraph:
    """The imports that run when a module loads: those inside functions removed."""
    graph = grimp.build_graph(ROOT, cache_dir=None)
    for importer, imported in function_local_edges(graph):
        graph.remove_import(importer=importer, imported=imported)
    return graph


def source_of(module: str) -> Path:
    path = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@cache
def function_local_lines(module: str) -> frozenset[int]:
    """Lines of the import statements inside a function body of ``module``."""
    tree = ast.parse(source_of(module).read_text(), filename=str(source_of(module)))
    return frozenset(
        node.lineno
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.Import | ast.ImportFrom)
    )


def function_local_edges(graph: grimp.ImportGraph) -> list[Edge]:
    """Edges all of whose import statements sit inside functions."""
    edges = []
    for importer in sorted(graph.modules):
        local = function_local_lines(importer)
        if not local:
            continue
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            details = graph.get_import_details(importer=importer, imported=imported)
            if details and all(detail["line_number"] in local for detail in details):
                edges.append((importer, imported))
    return edges


def describe(graph: grimp.ImportGraph, chain: Iterable[str]) -> str:
    """``a -> b -> c``, then the import statement of each step, as ``file:line``."""
    steps = list(chain)
    lines = ["  " + " -> ".join(steps)]
    for importer, imported in itertools.pairwise(steps):
        detail = min(
            graph.get_import_details(importer=importer, imported=imported),
            key=lambda d: d["line_number"],
        )
        where = source_of(importer).relative_to(PACKAGE_DIR.parent)
        lines.append(f"      {where}:{detail['line_number']}: {detail['line_contents']}")
    return "\n".join(lines)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@cache
def cycles() -> tuple[tuple[str, ...], ...]:
    """Each distinct shortest cycle through an edge of the eager graph, as a closed chain
    (``a, b, ..., a``), rotated to start at its least module."""
    graph = eager_graph()
    found: set[tuple[str, ...]] = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is None:
                continue
            ring = (importer, *back[:-1])  # a, b, ..., z where z imports a
            start = ring.index(min(ring))
            ring = ring[start:] + ring[:start]
            found.add((*ring, ring[0]))
    return tuple(sorted(found, key=lambda ring: (len(ring), ring)))


def test_the_graph_holds_every_module_on_disk_through_the_links() -> None:
    on_disk = set()
    for folder, dirs, files in os.walk(PACKAGE_DIR, followlinks=True):
        dirs[:] = [d for d in dirs if (Path(folder, d) / "__init__.py").is_file()]
        parts = Path(folder).relative_to(PACKAGE_DIR.parent).parts
        for name in files:
            if name.endswith(".py"):
                stem = name.removesuffix(".py")
                on_disk.add(".".join(parts if stem == "__init__" else (*parts, stem)))
    assert set(SUBPACKAGES) <= on_disk
    assert full_graph().modules == on_disk


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_no_import_cycles(package: str) -> None:
    mine = [ring for ring in cycles() if any(within(module, package) for module in ring)]
    report = "\n".join(describe(eager_graph(), ring) for ring in mine)
    if mine:
        pytest.fail(
            f"{len(mine)} import cycle(s) through {package} (module-level imports, "
            "`if TYPE_CHECKING:` ones included; imports inside functions do not count). "
            f"Break each by moving what both sides need into a small module of its own:\n{report}",
            pytrace=False,
        )


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("rexec.dispatcher", "rexec.worker"),
        ("rexec.worker", "rexec.dispatcher"),
        ("rexec.worker", "rexec.client"),
        ("rexec.schemas", "rexec.dispatcher"),
        ("rexec.schemas", "rexec.worker"),
        ("rexec.schemas", "rexec.client"),
        # Airflow's side: the executor and the log reader are API clients, the runner is task
        # code on an agent; nothing of rexec's own imports Airflow's integration.
        ("rexec.airflow", "rexec.dispatcher"),
        ("rexec.airflow.executor", "rexec.worker"),
        ("rexec.airflow.logs", "rexec.worker"),
        ("rexec.airflow.runner", "rexec.client"),
        ("rexec.dispatcher", "rexec.airflow"),
        ("rexec.worker", "rexec.airflow"),
        ("rexec.client", "rexec.airflow"),
        ("rexec.schemas", "rexec.airflow"),
    ],
)
def test_forbidden_imports(importer: str, imported: str) -> None:
    graph = full_graph()
    chains = graph.find_shortest_chains(importer=importer, imported=imported, as_packages=True)
    report = "\n".join(describe(graph, chain) for chain in sorted(chains))
    if chains:
        pytest.fail(
            f"{importer} imports {imported} (the dispatcher and the worker share only "
            f"rexec.schemas, which imports neither them nor the client):\n{report}",
            pytrace=False,
        )

"""The import contract: layers run one way, nothing imports itself back (issue 13).

The graph is grimp's (the engine under import-linter): every ``import`` statement of
``cxr_auditor`` and ``dicom_agent``, those inside functions and under ``TYPE_CHECKING``
included. Four rules:

* **Layers** (:data:`LAYERS`, top first): a module imports its own layer or a lower one, never a
  higher one. Every module of the two packages must have a layer, so a new module is placed
  on purpose.
* **No cycles**: no loop between modules, nor between the children of one package (subpackages
  counted whole, as import-linter's ``acyclic_siblings`` contract does).
* **Imports inside functions** in ``cxr_auditor`` are for the model stack only (torch,
  transformers, peft and their hub client, weight format and quantiser), never for a module of
  our own (read from the source: grimp's import details leave ``is_lazy`` false for them).
* **Nothing hidden**: neither package imports through ``importlib.import_module`` or
  ``__import__``, which the graph cannot see.

The checks are plain functions of a graph or a source text, so :class:`TestTheContractCanFail`
proves each one fails on a known-bad input.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cxr_auditor", "dicom_agent")

#: Layers, top first. An entry is a module and everything under it; the longest entry that
#: matches a module is its place. ``cxr_auditor`` (the package's re-exports) matches itself only.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("dicom_agent.cli",),
    ("dicom_agent.commands",),
    ("dicom_agent",),
    ("cxr_auditor",),
    ("cxr_auditor.pipeline", "cxr_auditor.render", "cxr_auditor.eval"),
    ("cxr_auditor.grounding", "cxr_auditor.drafts", "cxr_auditor.classification"),
    ("cxr_auditor.chat",),
    (
        "cxr_auditor.parsing",
        "cxr_auditor.prompts",
        "cxr_auditor.profiles",
        "cxr_auditor.retry",
        "cxr_auditor.comparator",
    ),
    ("cxr_auditor.labels", "cxr_auditor.schema", "cxr_auditor.errors", "cxr_auditor.geometry"),
)
#: Entries that match only the module itself, not the modules under it.
EXACT = frozenset({"cxr_auditor"})
#: Third-party roots a core module may import inside a function: the optional model stack.
LAZY_ALLOWED = frozenset(
    {"torch", "transformers", "peft", "huggingface_hub", "safetensors", "bitsandbytes"}
)


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` (0 is the top) of ``module``; None when no entry matches."""
    best: tuple[int, int] | None = None  # (entry length, layer index)
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            inside = module == entry or (entry not in EXACT and module.startswith(entry + "."))
            if inside and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def _where(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    lines = sorted(
        d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)
    )
    return f"{importer} -> {imported}" + (f" (line {lines[0]})" if lines else "")


def unplaced_modules(graph: grimp.ImportGraph) -> list[str]:
    """Modules of the graph that no layer holds."""
    return sorted(m for m in graph.modules if layer_of(m) is None)


def upward_imports(graph: grimp.ImportGraph) -> list[str]:
    """``importer -> imported (line N)`` for every import of a higher layer."""
    found = []
    for importer in sorted(graph.modules):
        low = layer_of(importer)
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            high = layer_of(imported)
            if low is not None and high is not None and high < low:
                found.append(_where(graph, importer, imported))
    return found


def _cycles(nodes: Iterable[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return sorted(found)


def module_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others."""
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    return _cycles(graph.modules, edges)


def sibling_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Groups of children of one package (each subpackage counted whole) that import each
    other, e.g. ``grounding`` -> ``drafts`` -> ``grounding`` through different modules."""
    found = []
    for parent in sorted(graph.modules):
        children = graph.find_children(parent)

        def child_of(module: str, children: set[str] = children) -> str | None:
            return next((c for c in children if module == c or module.startswith(c + ".")), None)

        edges: dict[str, set[str]] = {}
        for module in graph.modules:
            source = child_of(module)
            for imported in graph.find_modules_directly_imported_by(module):
                target = child_of(imported)
                if source and target and source != target:
                    edges.setdefault(source, set()).add(target)
        found.extend(_cycles(children, edges))
    return found


def hidden_imports(source: str, name: str) -> list[str]:
    """``name:line`` of each ``importlib.import_module`` / ``__import__`` call in ``source``
    (the graph cannot see what they import)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                found.append(f"{name}:{node.lineno}")
    return found


def deferred_imports(source: str, name: str) -> list[str]:
    """``name:line root`` of each import inside a function whose root is not in
    :data:`LAZY_ALLOWED` (our own modules, the standard library and other packages alike)."""
    found = set()
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            roots: list[str] = []
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = ["." * node.level + (node.module or "").split(".")[0]]
            found.update(f"{name}:{node.lineno} {r}" for r in roots if r not in LAZY_ALLOWED)
    return sorted(found)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def _sources(package: str) -> list[tuple[str, str]]:
    return [
        (str(p.relative_to(ROOT)), p.read_text(encoding="utf-8"))
        for p in sorted((ROOT / package).rglob("*.py"))
    ]


class TestContract:
    def test_every_module_has_a_layer(self, graph: grimp.ImportGraph) -> None:
        assert unplaced_modules(graph) == [], "add the module to LAYERS in this file"

    def test_no_module_imports_a_higher_layer(self, graph: grimp.ImportGraph) -> None:
        assert upward_imports(graph) == []

    def test_no_module_cycle(self, graph: grimp.ImportGraph) -> None:
        assert module_cycles(graph) == []

    def test_no_cycle_between_siblings(self, graph: grimp.ImportGraph) -> None:
        assert sibling_cycles(graph) == []

    def test_core_defers_only_the_model_stack(self) -> None:
        found = [
            hit for name, src in _sources("cxr_auditor") for hit in deferred_imports(src, name)
        ]
        assert found == []

    def test_no_import_is_hidden_from_the_graph(self) -> None:
        found = [
            hit
            for pkg in PACKAGES
            for name, src in _sources(pkg)
            for hit in hidden_imports(src, name)
        ]
        assert found == []


def _bad_graph() -> grimp.ImportGraph:
    """A core with a base type importing the pipeline, a loop between two chat modules, a
    grounding <-> drafts package loop without a module loop."""
    bad = grimp.ImportGraph()
    for module in (
        "cxr_auditor",
        "cxr_auditor.schema",
        "cxr_auditor.pipeline",
        "cxr_auditor.chat",
        "cxr_auditor.chat.base",
        "cxr_auditor.chat.openai",
        "cxr_auditor.grounding",
        "cxr_auditor.grounding.report",
        "cxr_auditor.drafts",
        "cxr_auditor.drafts.llm",
        "cxr_auditor.stray",
    ):
        bad.add_module(module)

    def imp(importer: str, imported: str, line: int) -> None:
        bad.add_import(
            importer=importer,
            imported=imported,
            line_number=line,
            line_contents=f"import {imported}",
        )

    imp("cxr_auditor.schema", "cxr_auditor.pipeline", 3)
    imp("cxr_auditor.chat.base", "cxr_auditor.chat.openai", 4)
    imp("cxr_auditor.chat.openai", "cxr_auditor.chat.base", 5)
    imp("cxr_auditor.grounding.report", "cxr_auditor.drafts", 6)
    imp("cxr_auditor.drafts.llm", "cxr_auditor.grounding", 7)
    return bad


class TestTheContractCanFail:
    """Each check, fed a known-bad graph or source, reports exactly the planted fault."""

    def test_upward_import(self) -> None:
        assert upward_imports(_bad_graph()) == [
            "cxr_auditor.schema -> cxr_auditor.pipeline (line 3)"
        ]

    def test_core_importing_the_dicom_side_is_upward(self) -> None:
        bad = grimp.ImportGraph()
        bad.add_import(importer="cxr_auditor.render", imported="dicom_agent.pixels")
        assert upward_imports(bad) == ["cxr_auditor.render -> dicom_agent.pixels"]

    def test_unplaced_module(self) -> None:
        assert unplaced_modules(_bad_graph()) == ["cxr_auditor.stray"]

    def test_module_cycle(self) -> None:
        assert module_cycles(_bad_graph()) == [["cxr_auditor.chat.base", "cxr_auditor.chat.openai"]]

    def test_sibling_cycle(self) -> None:
        assert sibling_cycles(_bad_graph()) == [
            ["cxr_auditor.drafts", "cxr_auditor.grounding"],
            ["cxr_auditor.chat.base", "cxr_auditor.chat.openai"],
        ]

    def test_hidden_and_deferred_imports(self) -> None:
        source = (
            "import importlib\n"
            "def f():\n"
            "    import torch, httpx\n"
            "    import json\n"
            "    from cxr_auditor.chat import ChatRequest\n"
            "    def g():\n"
            "        from . import base\n"
            "        from peft import PeftModel\n"
            "    return importlib.import_module('cxr_auditor.drafts.llm')\n"
        )
        assert hidden_imports(source, "m.py") == ["m.py:9"]
        assert deferred_imports(source, "m.py") == [
            "m.py:3 httpx",
            "m.py:4 json",
            "m.py:5 cxr_auditor",
            "m.py:7 .",
        ]

"""The package's layout: subpackages that say what each part is, dependencies pointing one way
(integrations -> attribution -> ops -> _runtime), and no import cycle, read from the source by
tools/import_graph.py (imports inside functions included)."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
sys.modules["import_graph"] = import_graph
_spec.loader.exec_module(import_graph)


def test_no_import_cycle():
    assert import_graph.cycles(import_graph.edges()) == []


def test_dependencies_point_one_way():
    assert import_graph.upward_edges(import_graph.edges()) == []


def test_every_module_is_in_a_layer():
    for name in import_graph.modules():
        import_graph.layer_of(name)  # raises for a module no layer names


def test_at_most_ten_top_level_modules():
    top = import_graph.top_level_modules()
    assert len(top) <= 10, top


def test_subpackage_inits_import_nothing_of_fastattr():
    """Importing one op or one attribution module must not import its siblings (that is what keeps
    the package-level edges out of the graph)."""
    for name in ("fastattr.ops", "fastattr.attribution", "fastattr.integrations", "fastattr._runtime"):
        path = import_graph.modules()[name]
        tree = ast.parse(path.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], name


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above can fail: a graph with a cycle and an op importing the adapter."""
    graph = {"fastattr.ops.a": {"fastattr.ops.b"}, "fastattr.ops.b": {"fastattr.ops.a", "fastattr.integrations.x"},
             "fastattr.integrations.x": set()}
    assert import_graph.cycles(graph) == [["fastattr.ops.a", "fastattr.ops.b"]]
    assert import_graph.upward_edges(graph) == [("fastattr.ops.b", "fastattr.integrations.x")]


def test_function_level_imports_are_edges():
    edges = import_graph.edges()
    # integrations.circuit_tracer imports the driver; the driver never imports the adapter.
    assert "fastattr.attribution.driver" in edges["fastattr.integrations.circuit_tracer"]
    assert not any(t.startswith("fastattr.integrations") for t in edges["fastattr.attribution.driver"])

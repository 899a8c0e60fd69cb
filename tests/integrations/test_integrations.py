"""The circuit-tracer integration: names bound before the patch, call counting and the pytest
plugin, and upstream drift detected by structure (small fakes for versions not installed here)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import textwrap
import types

import fastattr
import pytest
import torch
from fastattr.attribution import replacement_model as rm
from fastattr.integrations import circuit_tracer as integ
from fastattr.patch import UnsupportedCircuitTracerError

ct = pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed")
import circuit_tracer.graph as ct_graph
from circuit_tracer.attribution import attribute as ct_attribute_module
from helpers import random_graph

EARLY = "fastattr_test_early_binder"


@pytest.fixture
def early_module(tmp_path, monkeypatch):
    """A module that imported circuit-tracer's names before any patch, as graph servers do."""
    (tmp_path / f"{EARLY}.py").write_text(textwrap.dedent("""
        from circuit_tracer import attribute
        from circuit_tracer.graph import prune_graph
        from circuit_tracer.graph import compute_node_influence as node_influence
        import circuit_tracer.graph as graph_module

        def serve(graph):
            return prune_graph(graph)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(EARLY)
    yield module
    sys.modules.pop(EARLY, None)


def test_names_bound_before_the_patch_are_reached_and_restored(early_module):
    originals = {n: early_module.__dict__[n] for n in ("attribute", "prune_graph", "node_influence")}
    assert originals["prune_graph"] is ct_graph.prune_graph
    assert originals["attribute"] is ct.attribute
    graph = random_graph(seed=3)
    with fastattr.patch_circuit_tracer() as handle:
        assert early_module.prune_graph is fastattr.prune_graph
        assert early_module.node_influence is fastattr.compute_node_influence  # under another name
        assert early_module.attribute is fastattr.attribute
        assert f"{EARLY}.prune_graph" in handle.replaced
        got = early_module.serve(graph)
        assert fastattr.last_backend("prune_graph") is not None
    want = fastattr.reference.prune_graph(graph)
    assert torch.equal(got.node_mask, want.node_mask) and torch.equal(got.edge_mask, want.edge_mask)
    for name, fn in originals.items():
        assert early_module.__dict__[name] is fn, name
    assert ct_graph.prune_graph is originals["prune_graph"] and ct.attribute is originals["attribute"]


def test_fastattr_modules_keep_circuit_tracers_functions(monkeypatch):
    """fastattr's own modules may hold circuit-tracer's functions to compare against: left alone."""
    original = ct_graph.prune_graph
    holder = types.ModuleType("fastattr._test_holder")
    holder.prune_graph = original
    monkeypatch.setitem(sys.modules, "fastattr._test_holder", holder)
    with fastattr.patch_circuit_tracer(attribute=False):
        assert ct_graph.prune_graph is fastattr.prune_graph
        assert holder.prune_graph is original


def test_count_calls_counts_each_replaced_function(early_module):
    graph = random_graph(seed=5)
    with fastattr.patch_circuit_tracer(attribute=False, count_calls=True) as handle:
        # One wrapper per function: every binding holds the same object, wrapping fastattr's.
        assert early_module.prune_graph is ct_graph.prune_graph
        assert ct_graph.prune_graph.__wrapped__ is fastattr.prune_graph
        ct_graph.prune_graph(graph)
        early_module.serve(graph)
        ct_graph.find_threshold(torch.rand(10), 0.5)
    assert handle.calls["circuit_tracer.graph.prune_graph"] == 2
    assert handle.calls["circuit_tracer.graph.find_threshold"] == 1
    assert handle.calls["circuit_tracer.graph.compute_node_influence"] == 0  # fastattr calls its own
    assert ct_graph.prune_graph is early_module.prune_graph and not hasattr(ct_graph.prune_graph, "__wrapped__")


def test_pytest_plugin_patches_the_whole_run_and_reports(tmp_path):
    (tmp_path / "test_host.py").write_text(textwrap.dedent("""
        import torch
        import fastattr
        from circuit_tracer.graph import find_threshold   # bound at import time, after the plugin patched

        def test_runs_patched():
            assert find_threshold.__wrapped__ is fastattr.find_threshold
            for _ in range(3):
                want = fastattr.reference.find_threshold(torch.arange(1.0, 9.0), 0.6)
                assert find_threshold(torch.arange(1.0, 9.0), 0.6) == want
    """))
    report = tmp_path / "calls.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("FASTATTR_BACKEND", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fastattr.pytest_plugin",
         f"--fastattr-report={report}", "--fastattr-patch=contraction,graph", str(tmp_path / "test_host.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "fastattr: patched circuit-tracer functions" in run.stdout
    data = json.loads(report.read_text())
    assert data["calls"]["circuit_tracer.graph.find_threshold"] == 3
    assert data["calls"]["circuit_tracer.graph.prune_graph"] == 0
    assert "circuit_tracer.attribution.attribute.attribute" not in data["calls"]  # attribute not patched
    assert any(k.endswith("AttributionContext._make_attribution_hooks") for k in data["calls"])


# ------------------------------------------------------------------------------------ drift, by structure


def test_graph_scan_renamed_to_scan_name():
    class GraphScan:
        def __init__(self, adjacency_matrix, scan=None): ...

    class GraphScanName:
        def __init__(self, adjacency_matrix, scan_name=None): ...

    class GraphNeither:
        def __init__(self, adjacency_matrix): ...

    assert rm.graph_kwargs(GraphScan, "s", adjacency_matrix=1) == {"adjacency_matrix": 1, "scan": "s"}
    assert rm.graph_kwargs(GraphScanName, "s", adjacency_matrix=1) == {"adjacency_matrix": 1, "scan_name": "s"}
    GraphScanName(**rm.graph_kwargs(GraphScanName, "s", adjacency_matrix=1))
    with pytest.raises(UnsupportedCircuitTracerError, match="Graph takes neither scan nor scan_name"):
        rm.graph_kwargs(GraphNeither, "s", adjacency_matrix=1)
    assert rm.model_scan(types.SimpleNamespace(scan_name="gemma")) == "gemma"
    assert rm.model_scan(types.SimpleNamespace(scan="llama", scan_name="x")) == "llama"


def test_graph_without_scan_is_unsupported(monkeypatch):
    class GraphNeither:
        def __init__(self, adjacency_matrix): ...

    monkeypatch.setattr(ct_graph, "Graph", GraphNeither)
    with pytest.raises(UnsupportedCircuitTracerError, match="missing a scan or scan_name parameter"):
        fastattr.patch_circuit_tracer()
    fastattr.patch_circuit_tracer(attribute=False).undo()  # the graph ops do not build graphs


def test_attribution_targets_api_missing_is_unsupported(monkeypatch):
    targets = importlib.import_module("circuit_tracer.attribution.targets")
    monkeypatch.delattr(targets, "AttributionTargets")
    with pytest.raises(UnsupportedCircuitTracerError, match="targets.AttributionTargets .*attribution_targets"):
        fastattr.patch_circuit_tracer()
    assert ct_attribute_module.attribute is not fastattr.attribute  # nothing left patched


def _fake_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    vars(module).update(attrs)
    return module


def test_nnsight_08_transformers_model(monkeypatch):
    """nnsight >= 0.8 names its HF model class TransformersModel (LanguageModel a deprecated alias,
    or gone): a model of either is recognised without circuit-tracer's backend attribute."""

    class TransformersModel:
        pass

    monkeypatch.setitem(sys.modules, "nnsight", _fake_module("nnsight", TransformersModel=TransformersModel))
    assert rm.nnsight_model_classes() == (TransformersModel,)
    assert rm._is_nnsight(TransformersModel())
    assert not rm._is_nnsight(object())
    assert rm._is_nnsight(types.SimpleNamespace(backend="nnsight"))

    class OldTracer:
        def invoke(self, *a): ...

    with pytest.raises(UnsupportedCircuitTracerError, match=r"OldTracer has no barrier\(\)"):
        rm.check_nnsight_tracer(OldTracer())


def _break_backends(monkeypatch, *, tl: bool, nn: bool) -> None:
    """TransformerLens 4 (no HookedTransformer) and/or an nnsight with no HF model class, each
    making circuit-tracer's modules for that backend fail to import."""
    if tl:
        monkeypatch.setitem(sys.modules, "transformer_lens", _fake_module("transformer_lens", TransformerBridge=object))
        for name in integ._TL_MODULES:
            monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    if nn:
        monkeypatch.setitem(sys.modules, "nnsight", _fake_module("nnsight"))
        for name in integ._NNSIGHT_MODULES:
            monkeypatch.setitem(sys.modules, name, None)


def test_no_servable_backend_is_unsupported_naming_both(monkeypatch):
    _break_backends(monkeypatch, tl=True, nn=True)
    with pytest.raises(UnsupportedCircuitTracerError,
                       match=r"transformer_lens.HookedTransformer \(TransformerLens 4 .*\); "
                             r"nnsight.LanguageModel or nnsight.TransformersModel"):
        integ.check_structure("test", attribute=False)


@pytest.mark.parametrize("broken", ["transformer_lens", "nnsight"])
def test_one_broken_backend_is_logged_and_the_other_served(monkeypatch, caplog, broken):
    _break_backends(monkeypatch, tl=broken == "transformer_lens", nn=broken == "nnsight")
    with caplog.at_level("INFO", logger="fastattr"):
        integ.check_structure("test", attribute=True)
    want = "transformer_lens.HookedTransformer" if broken == "transformer_lens" else "nnsight.LanguageModel or"
    assert want in caplog.text


def test_reexports_keep_working():
    from fastattr import patch

    assert patch.patch_circuit_tracer is integ.patch_circuit_tracer is fastattr.patch_circuit_tracer is integ.apply
    assert patch.UnsupportedCircuitTracerError is integ.UnsupportedCircuitTracerError


def test_backend_contract_worked_example_runs(capsys):
    """docs/backend_contract.md's worked example (an outside tracer's adapter) runs as written."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "backend_contract.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(doc), "exec"), {"__name__": "backend_contract_example"})
    assert "agree" in capsys.readouterr().out

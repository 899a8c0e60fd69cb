"""A pytest plugin that runs a whole test session with ``fastattr.patch_circuit_tracer()`` applied.

    pytest -p fastattr.pytest_plugin [--fastattr-report=calls.json] [--fastattr-patch=contraction,graph,attribute]

The patch is applied when pytest configures, before any test module is imported, so tests that do
``from circuit_tracer import attribute`` at import time get the patched function (names bound
earlier, by conftest files or plugins, are reached too: the patch swaps every module-level binding).
It is undone when pytest exits. At the end of the run the terminal summary lists every function the
patch replaced and how many times it ran; ``--fastattr-report`` also writes that as JSON.

This is how to check that a tracer's own test suite passes with fastattr in place: run it once
plain and once with ``-p fastattr.pytest_plugin`` (see docs/compatibility.md).
"""

from __future__ import annotations

import json

from fastattr.integrations.circuit_tracer import patch_circuit_tracer

_PARTS = ("contraction", "graph", "attribute")
_KEY = "_fastattr_patch_handle"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("fastattr", "fastattr: circuit-tracer patched for the whole run")
    group.addoption("--fastattr-patch", default=",".join(_PARTS),
                    help="comma-separated parts of patch_circuit_tracer() to apply (default: %(default)s)")
    group.addoption("--fastattr-report", default=None, metavar="PATH",
                    help="write the replaced functions and their call counts to PATH as JSON")


def pytest_configure(config) -> None:
    parts = [p.strip() for p in config.getoption("--fastattr-patch").split(",") if p.strip()]
    unknown = sorted(set(parts) - set(_PARTS))
    if unknown:
        raise ValueError(f"--fastattr-patch: expected a comma-separated subset of {', '.join(_PARTS)}, got {unknown}")
    handle = patch_circuit_tracer(count_calls=True, **{p: p in parts for p in _PARTS})
    setattr(config, _KEY, handle)


def calls(handle) -> dict[str, int]:
    """Every replaced function (circuit-tracer's qualified name) with the number of calls it got."""
    return {key: handle.calls.get(key, 0) for key in sorted(handle._wrappers)}


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    handle = getattr(config, _KEY, None)
    if handle is None:
        return
    table = calls(handle)
    terminalreporter.section("fastattr: patched circuit-tracer functions")
    terminalreporter.write_line(f"circuit-tracer {handle.version}; {len(handle.replaced)} bindings replaced")
    width = max((len(k) for k in table), default=0)
    for key, n in table.items():
        terminalreporter.write_line(f"  {key:<{width}}  {n:>8} call{'s' if n != 1 else ''}")
    path = config.getoption("--fastattr-report")
    if path:
        with open(path, "w") as f:
            json.dump({"circuit_tracer": handle.version, "bindings": handle.replaced, "calls": table}, f, indent=1)


def pytest_unconfigure(config) -> None:
    handle = getattr(config, _KEY, None)
    if handle is not None:
        handle.undo()
        delattr(config, _KEY)

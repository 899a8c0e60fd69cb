"""fastattr's import graph, read from the source: every import of a fastattr module, at module
level or inside a function, as an edge between modules.

    python tools/import_graph.py            # the layers, the cycles and any edge against the layering

``from fastattr.x import y`` is an edge to ``fastattr.x.y`` when that is a module, else to
``fastattr.x``. Importing ``fastattr.a.b`` also runs the package ``fastattr.a``'s ``__init__``; the
subpackages' ``__init__`` files import nothing, so that edge adds no cycle and is not drawn.
The top-level package ``fastattr`` (its ``__init__``, which re-exports the public API) is drawn like
any module: code inside the package imports the public names from the modules that define them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The package as the wheel lays it out: python/fastattr plus kernels/triton_kernels.
SOURCES = {"fastattr": ROOT / "python" / "fastattr", "fastattr.triton_kernels": ROOT / "kernels" / "triton_kernels"}

# The layering, lowest first. A module may import its own layer and the layers below, never above.
LAYERS = (
    ("runtime", ("fastattr._runtime", "fastattr._C", "fastattr.triton_kernels")),
    ("reference", ("fastattr.reference",)),
    ("ops", ("fastattr.ops",)),
    ("attribution", ("fastattr.attribution",)),
    ("integrations", ("fastattr.integrations", "fastattr.patch", "fastattr.pytest_plugin")),
    ("package", ("fastattr", "fastattr.__main__", "fastattr.attribute_many", "fastattr.demo", "fastattr.selftest",
                 "fastattr.synthetic")),
)


def modules() -> dict[str, Path]:
    """Module name -> file, for every fastattr module."""
    found: dict[str, Path] = {}
    for prefix, base in SOURCES.items():
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([prefix, *parts])] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        if name == "fastattr._C":
            return name
        name = name.rpartition(".")[0]
    return name or None


def edges(known: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> the fastattr modules it imports (anywhere in its body)."""
    known = modules() if known is None else known
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if not target.startswith("fastattr"):
                    continue
                resolved = _resolve(target, known)
                if resolved is not None and resolved != name:
                    graph[name].add(resolved)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(name: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    if level is None:
        raise KeyError(f"{name} is in no layer of tools/import_graph.py's LAYERS")
    return level


def upward_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a lower layer into a higher one (an op importing attribution, ...)."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def top_level_modules(known: dict[str, Path] | None = None) -> list[str]:
    known = modules() if known is None else known
    return sorted(n for n, p in known.items() if n.count(".") == 1 and p.name != "__init__.py")


def main() -> int:
    graph = edges()
    for i, (layer, prefixes) in enumerate(LAYERS):
        members = sorted(n for n in graph if layer_of(n) == i)
        print(f"{layer:<13} {len(members):>3} modules  ({', '.join(prefixes)})")
    top = top_level_modules()
    print(f"top level: {len(top)} modules: {', '.join(top)}")
    bad = cycles(graph)
    up = upward_edges(graph)
    for component in bad:
        print("cycle:", " <-> ".join(component))
    for a, b in up:
        print(f"upward import: {a} -> {b}")
    print("no cycles, no upward imports" if not bad and not up else f"{len(bad)} cycles, {len(up)} upward imports")
    return 1 if bad or up else 0


if __name__ == "__main__":
    sys.exit(main())

"""The package's import graph: no cycles, and every import points down the layers.

Layers, lowest first (a module may import its own layer or lower ones, never a higher one):

  0 foundation   prism_edge.config, prism_edge.flags, prism_edge.version, prism_edge.frontiers, prism_edge.data (data files)
  1 models       one adapter per family, loading
  2 partition    plans and masks
  3 runtime      per-device execution (prefill and decode halves), messages, the wire format, communicator
                 interfaces, the simulator, stats, generation
  4 cluster      the multi-process runtime: transport (the only torch.distributed sends and receives),
                 rendezvous, start-up, the coordinator on rank 0, the worker loop, launch spec, heartbeat
  5 measurement  eval, train, finetune, bench (every bench, the ones that start processes too)
  6 app          command line and the HTTP / OpenAI server, and the entry modules prism_edge.__main__ and
                 prism_edge.worker

The package root (prism_edge/__init__.py) is a facade: at run time it imports only the foundation
(everything else loads on first use through its __getattr__), and no module imports it.  Every import
counts: at module level, inside functions, and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1] / "prism_edge"
LAYERS = (
    ("foundation", ("prism_edge.config", "prism_edge.flags", "prism_edge.version", "prism_edge.frontiers",
                    "prism_edge.data")),
    ("models", ("prism_edge.models",)),
    ("partition", ("prism_edge.partition",)),
    ("runtime", ("prism_edge.runtime", "prism_edge.planning")),
    ("cluster", ("prism_edge.cluster",)),
    ("measurement", ("prism_edge.eval", "prism_edge.train", "prism_edge.finetune", "prism_edge.bench")),
    ("app", ("prism_edge.app", "prism_edge.__main__", "prism_edge.worker")),
)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer(name: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS in {__file__}")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: dict[str, Path], runtime_only: bool = False) -> set[str]:
    """The package modules `name` imports (a `from X import y` of a submodule y counts as X.y).
    runtime_only: only what module-level code imports when the module loads (no functions, no TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if runtime_only and (isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                                 or (isinstance(child, ast.If) and _is_type_checking(child))):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                subs = [f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in known]
                found.update(subs if len(subs) == len(child.names) else [base, *subs])
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m == "prism_edge" or m.startswith("prism_edge.")}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    for name in modules():
        if name != "prism_edge":
            layer(name)


def test_no_import_points_up():
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
              for a, targets in graph().items() if a != "prism_edge"
              for b in sorted(targets) if b != "prism_edge" and layer(b) > layer(a)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_nothing_imports_the_package_root_and_it_loads_only_the_foundation():
    known = modules()
    users = sorted(a for a, targets in graph().items() if "prism_edge" in targets and a != "prism_edge")
    assert not users, f"these modules import the package root (import the defining module instead): {users}"
    eager = imports("prism_edge", known["prism_edge"], known, runtime_only=True)
    assert all(layer(m) == 0 for m in eager), f"prism_edge/__init__.py loads {sorted(eager)} eagerly"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return found


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_what_it_should():
    """The graph walker itself: relative imports, submodules, imports in functions, cycles."""
    g = graph()
    assert "prism_edge.runtime.wire" in g["prism_edge.runtime.simulator"]
    assert "prism_edge.flags" in g["prism_edge.cluster.spec"]  # `from ..flags import config_args`
    assert "prism_edge.eval.harness" in g["prism_edge.app.commands"]  # imported inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


P2P_AND_COLLECTIVES = {"send", "recv", "isend", "irecv", "allgather", "all_gather", "allreduce", "all_reduce",
                       "broadcast", "barrier", "gather", "scatter", "all_to_all", "reduce_scatter"}
# the tensor-parallel baseline runs torch's own TP (DTensor collectives), not prism-edge's runtime
OWN_COLLECTIVES = {"prism_edge.cluster.transport", "prism_edge.bench.tp"}


def distributed_calls(path: Path) -> list[str]:
    """`x.send(...)`-style calls of torch.distributed's point-to-point and collective functions in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in P2P_AND_COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed") or "group" in owner:
                found.append(f"{ast.unparse(node.func)} (line {node.lineno})")
    return found


def test_only_the_transport_sends_and_receives():
    """Every byte between processes goes through cluster/transport.py (which counts it)."""
    offenders = {name: calls for name, path in modules().items() if name not in OWN_COLLECTIVES
                 for calls in [distributed_calls(path)] if calls}
    assert not offenders, f"torch.distributed sends, receives or collectives outside the transport: {offenders}"
    assert distributed_calls(modules()["prism_edge.cluster.transport"])  # the checker sees the real ones


def test_one_bench_package_and_the_runtime_below_the_application():
    names = modules()
    assert not [n for n in names if n.startswith(("prism_edge.app.cluster", "prism_edge.app.bench"))]
    assert [n for n in names if ".bench" in n and not n.startswith("prism_edge.bench")] == []
    assert "prism_edge.cluster.transport" in names and "prism_edge.runtime.wire" in names

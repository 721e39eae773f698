"""Guards on the shape of the code base (see docs/architecture.md): layers, no import cycles, no library
module importing the command-line layer, file length, no references to documents outside the repository.

Imports are read with ``ast`` from the source files (nothing is imported), including imports inside functions
and ``if TYPE_CHECKING:`` blocks: a deferred import is still a dependency.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nnunet_hyspark"
#: Source folders and the package name their files are installed under (pyproject.toml's package-dir).
SOURCE_ROOTS = {ROOT / "nnunet_hyspark": "nnunet_hyspark", ROOT / "trainers": "nnunet_hyspark.trainers",
                ROOT / "planners": "nnunet_hyspark.planners"}

#: Layer of every module, by longest matching dotted prefix. A module may import its own layer and lower ones.
LAYERS: dict[str, int] = {
    # 0: building blocks without knowledge of nnU-Net plans or methods
    "nnunet_hyspark": 0,  # the package __init__ (version only)
    "nnunet_hyspark.errors": 0,
    "nnunet_hyspark.io": 0,
    "nnunet_hyspark.schedules": 0,
    "nnunet_hyspark.optim": 0,
    "nnunet_hyspark.masking": 0,
    "nnunet_hyspark.layers": 0,
    "nnunet_hyspark.synthetic": 0,
    "nnunet_hyspark.runlock": 0,
    "nnunet_hyspark.safe_load": 0,
    # 1: shared pieces every method uses, and everything asked of nnU-Net
    "nnunet_hyspark.nnunet_compat": 1,
    "nnunet_hyspark.patch_rules": 1,
    "nnunet_hyspark.mae": 1,
    "nnunet_hyspark.memory": 1,
    "nnunet_hyspark.weights": 1,
    "nnunet_hyspark.sparse": 1,
    # 2: one package per method, and the registry
    "nnunet_hyspark.methods": 2,
    # 3: what runs methods: pre-training, planning, benchmarks
    "nnunet_hyspark.pretraining": 3,
    "nnunet_hyspark.planning": 3,
    "nnunet_hyspark.benchmark": 3,
    "nnunet_hyspark.sparse.benchmark": 3,  # times the HySparK encoder (a method) with each sparse backend
    # 4: entry points and nnU-Net-facing shells
    "nnunet_hyspark.cli": 4,
    "nnunet_hyspark.trainers": 4,
    "nnunet_hyspark.planners": 4,
    "nnunet_hyspark.models": 4,  # legacy re-exports of the network classes (old dotted paths in plans/weights)
}

MAX_LINES = 400
LENGTH_REASON = re.compile(r"longer than \d+ lines because", re.IGNORECASE)
REASON_WITHIN_LINES = 10
OUTSIDE_DOCS = re.compile(r"shared/design|design[ -]doc", re.IGNORECASE)


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the installed package."""
    out = {}
    for folder, package in SOURCE_ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, int]]:
    """(imported module of this package, line) for every import statement of module ``name``, at any depth."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own_package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        for target in targets:
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            while target not in MODULES and "." in target:  # `import pkg.mod.attr` style or a missing module
                target = target.rpartition(".")[0]
            if (target, node.lineno) not in found:  # `from m import a, b`: one dependency
                found.append((target, node.lineno))
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int | None:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def _rel(name: str) -> str:
    return MODULES[name].relative_to(ROOT).as_posix()


def test_every_module_has_a_layer():
    missing = [_rel(m) for m in MODULES if _layer(m) is None]
    assert not missing, f"modules without a layer (add them to LAYERS in {Path(__file__).name}): {missing}"


def test_library_never_imports_cli():
    bad = [f"{_rel(m)}:{line} imports {t}" for m, deps in GRAPH.items()
           if not (m == f"{PACKAGE}.cli" or m.startswith(f"{PACKAGE}.cli."))
           for t, line in deps if t == f"{PACKAGE}.cli" or t.startswith(f"{PACKAGE}.cli.")]
    assert not bad, "library modules import the command-line layer:\n" + "\n".join(bad)


def _strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the graph may be deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                    if len(component) > 1 or node in graph[node]:
                        components.append(sorted(component))
    return components


def test_cycle_finder_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert sorted(_strongly_connected_components(graph)) == [["a", "b", "c"], ["e"]]


def test_no_import_cycles():
    graph = {m: {t for t, _ in deps if t != m} for m, deps in GRAPH.items()}  # `from pkg import name` in pkg itself
    cycles = _strongly_connected_components(graph)
    details = []
    for component in cycles:
        members = set(component)
        edges = [f"  {_rel(m)}:{line} -> {t}" for m in component for t, line in GRAPH[m] if t in members and t != m]
        details.append("cycle between " + ", ".join(component) + "\n" + "\n".join(edges))
    assert not cycles, "import cycles inside the package:\n" + "\n".join(details)


def test_no_module_imports_a_higher_layer():
    bad = []
    for m, deps in GRAPH.items():
        own = _layer(m)
        for t, line in deps:
            theirs = _layer(t)
            if own is not None and theirs is not None and theirs > own:
                bad.append(f"{_rel(m)}:{line} (layer {own}) imports {t} (layer {theirs})")
    assert not bad, "imports of a higher layer (see LAYERS):\n" + "\n".join(bad)


def test_long_files_state_why():
    bad = []
    for path in sorted(set(MODULES.values())):
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_LINES and not any(LENGTH_REASON.search(l) for l in lines[:REASON_WITHIN_LINES]):
            bad.append(f"{path.relative_to(ROOT).as_posix()}: {len(lines)} lines")
    assert not bad, (f"files over {MAX_LINES} lines without a reason in their first {REASON_WITHIN_LINES} lines "
                     f"(\"longer than {MAX_LINES} lines because ...\"): split them or say why:\n" + "\n".join(bad))


def test_library_does_not_cite_documents_outside_the_repository():
    files = sorted(set(MODULES.values())) + sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    bad = [f"{p.relative_to(ROOT).as_posix()}:{i}: {line.strip()}" for p in files if p.is_file()
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE_DOCS.search(line)]
    assert not bad, ("references to documents outside the repository (write the fact, or cite docs/<file>.md):\n"
                     + "\n".join(bad))

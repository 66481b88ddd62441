"""The shape of ``vpr/``: layers that import downward only, no cycles, no reaching into private names.

Every ``import`` counts, including those inside functions (a function-level import hides a cycle from
Python, not from a reader). Layers, bottom to top:

0. foundations: config, atomic, geo, rng, procs, layout, imageio, progress, profiles, dvcrun, tables, datalock
1. shared parts: models, shardio, retrieval, checkpoints, descriptors, descstore, versions, splits, triplets,
   history
2. pipeline steps: catalog, shards, mining, train, evaluate, index, locate, inbox, batch, check, reindex, report,
   ablation, synth
3. the command line: cli

A module may import its own layer or any layer below; steps may use each other's public functions
(``reindex`` appends through ``catalog``, ``shards`` and ``index``), never a private one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

VPR = Path(__file__).resolve().parents[1] / "vpr"

LAYERS = {
    **dict.fromkeys(
        [
            "config",
            "atomic",
            "geo",
            "rng",
            "procs",
            "layout",
            "imageio",
            "progress",
            "profiles",
            "dvcrun",
            "tables",
            "datalock",
            "registry",
        ],
        0,
    ),
    **dict.fromkeys(
        [
            "models",
            "shardio",
            "retrieval",
            "checkpoints",
            "descriptors",
            "splits",
            "triplets",
            "history",
            "trunk",
            "distributed",
            "descstore",
            "versions",
        ],
        1,
    ),
    **dict.fromkeys(
        [
            "catalog",
            "shards",
            "mining",
            "train",
            "evaluate",
            "index",
            "locate",
            "inbox",
            "batch",
            "check",
            "reindex",
            "report",
            "ablation",
            "api",
            "launch",
            "initialise",
        ],
        2,
    ),
    "synth": 2,
    "cli": 3,
}
MAX_LINES = 450  # "about 400": one cohesive module may run a little over


def module_name(path: Path) -> str:
    rel = path.relative_to(VPR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def component(module: str) -> str:
    """``vpr.models.heads`` → ``models`` (the unit the layers talk about)."""
    return module.split(".")[1] if module.count(".") else module


def vpr_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported vpr module, names taken from it, line) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vpr"):
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("vpr")]
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(VPR.rglob("*.py"))}


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    mods = modules()
    for name, path in mods.items():
        graph.add_node(name)
        for target, names, _ in vpr_imports(path):
            for sub in names:  # `from vpr.models import heads` imports the module vpr.models.heads
                if f"{target}.{sub}" in mods:
                    graph.add_edge(name, f"{target}.{sub}")
                    break
            else:
                graph.add_edge(name, target)
    return graph


def test_every_module_has_a_layer():
    unknown = sorted({component(m) for m in modules() if m != "vpr"} - set(LAYERS))
    assert not unknown, f"give these modules a layer in tests/test_architecture.py: {unknown}"


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ re-exporting its own submodules is not a cycle between components
    within = [(a, b) for a, b in graph.edges if component(a) == component(b) and a in ("vpr.models", "vpr.synth")]
    graph.remove_edges_from(within)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"


def test_imports_point_downward_only():
    bad = []
    for name, path in modules().items():
        if name == "vpr":
            continue
        for target, _, line in vpr_imports(path):
            if target == "vpr":
                continue
            if LAYERS[component(target)] > LAYERS[component(name)]:
                bad.append(
                    f"{path.name}:{line} ({component(name)}, layer {LAYERS[component(name)]}) imports "
                    f"{target} (layer {LAYERS[component(target)]})"
                )
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for name, path in modules().items():
        for target, names, line in vpr_imports(path):
            if target == name:
                continue
            bad += [
                f"{path.relative_to(VPR.parent)}:{line} takes {n} from {target}" for n in names if n.startswith("_")
            ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", sorted(VPR.rglob("*.py")), ids=lambda p: str(p.relative_to(VPR)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path} is over {MAX_LINES} lines: split it"


def test_library_never_imports_prefect():
    offenders = []
    for path in VPR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] == "prefect"]
    assert not offenders, offenders

"""The shape of the code: layers that import downward only, no cycles, no reaching into private names.

Every ``import`` counts, including those inside functions (a function-level import hides a cycle from
Python, not from a reader). Layers of ``vpr/``, bottom to top (docs/architecture.md draws them):

0. foundations: config, registry, atomic, geo, rng, procs, layout, imageio, progress, profiles, dvcrun,
   tables, datalock
1. shared parts: models, shardio, retrieval, checkpoints, descriptors, descstore, versions, release,
   splits, triplets, history, trunk, distributed
2. pipeline steps: catalog, shards, mining, initialise, train, evaluate, index, locate, inbox, batch,
   check, reindex, report, figures, ablation, api, launch, synth
3. the step table: steps
4. the command line: cli

A module may import its own layer or any layer below; steps may use each other's public functions
(``reindex`` appends through ``catalog``, ``shards`` and ``index``), never a private one. Above the
library, ``tasks/`` may import ``vpr``, ``flows/`` also ``tasks``, and ``bench/`` all three, never the tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

VPR = Path(__file__).resolve().parents[1] / "vpr"

# The folder is the layer: a module's layer is the folder it lives in, so the two cannot drift.
LAYERS = {"foundations": 0, "shared": 1, "steps": 2, "pipeline": 3, "cli": 4}
MAX_LINES = 400  # a module past this does two things: split it


def module_name(path: Path) -> str:
    rel = path.relative_to(VPR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def component(module: str) -> str:
    """``vpr.shared.models.heads`` → ``models`` (the unit the layers talk about)."""
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
            for sub in names:  # `from vpr.shared.models import heads` imports the module vpr.shared.models.heads
                if f"{target}.{sub}" in mods:
                    graph.add_edge(name, f"{target}.{sub}")
                    break
            else:
                graph.add_edge(name, target)
    return graph


def test_every_module_lives_in_a_layer_folder():
    unknown = sorted(m for m in modules() if m != "vpr" and component(m) not in LAYERS)
    assert not unknown, f"move these modules into vpr/foundations, vpr/shared or vpr/steps: {unknown}"
    folders = sorted(p.name for p in VPR.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(k for k in LAYERS if (VPR / k).is_dir())


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ re-exporting its own submodules is not a cycle between components
    within = [(a, b) for a, b in graph.edges if b.startswith(f"{a}.")]
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


# --------------------------------------------------------------------------- the four code packages

REPO = VPR.parent
PACKAGES = ("vpr", "tasks", "flows", "bench")
# which packages each may import: the library at the bottom, Prefect wrappers above it, flows on top;
# benchmarks use the library (and the flows they time), never the tests
MAY_IMPORT = {
    "vpr": {"vpr"},
    "tasks": {"vpr", "tasks"},
    "flows": {"vpr", "tasks", "flows"},
    "bench": {"vpr", "tasks", "flows", "bench"},
}


def package_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def dotted(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[str, list[str], dict[str, str], int]]:
    """(module, names taken, {local alias: module} for module bindings, line) for each import of project
    code (the four packages, the tests, and bench's own helper modules such as ``_common``)."""
    local = {p.stem for p in path.parent.glob("*.py")} if path.parts[-2] == "bench" else set()
    ours = {*PACKAGES, "tests", *local}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in ours:
            aliases = {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
            found.append((node.module, [a.name for a in node.names], aliases, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ours:
                    found.append(
                        (a.name, [], {a.asname or a.name.split(".")[0]: a.asname and a.name or a.name}, node.lineno)
                    )
    return found


def test_packages_import_only_what_sits_below_them():
    bad = []
    for path in package_files():
        package = path.relative_to(REPO).parts[0]
        for module, _, _, line in project_imports(path):
            top = module.split(".")[0]
            if package == "bench" and (REPO / "bench" / f"{top}.py").exists():
                continue  # bench's own helpers
            if top not in MAY_IMPORT[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} ({package}) imports {module}")
    assert not bad, "\n".join(bad)


def private_uses(path: Path, me: str) -> list[str]:
    """``from x import _y`` and ``x._y`` on project modules other than ``me`` in one file."""
    bad = []
    aliases: dict[str, str] = {}
    for module, names, bound, line in project_imports(path):
        if module != me:
            bad += [f"{path.name}:{line} takes {n} from {module}" for n in names if n.startswith("_")]
        aliases.update({k: v for k, v in bound.items() if v != me})
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            bad.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return bad


def test_no_code_reaches_into_another_modules_private_names():
    """Neither ``from x import _y`` nor ``x._y`` on another project module, in vpr/, tasks/, flows/, bench/."""
    bad = [f"{p.parent.name}/{b}" for p in package_files() for b in private_uses(p, dotted(p))]
    assert not bad, "\n".join(bad)


def test_the_private_name_check_catches_both_forms(tmp_path):
    """What bench/ used to do (monkeypatching ``vt._mine_chunk``, importing ``_metadata``) is caught."""
    probe = tmp_path / "bench" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(
        "import vpr.steps.train as vt\nfrom vpr.steps.index import _metadata, build_release\n\nvt._mine_chunk = None\n"
    )
    assert private_uses(probe, "bench.probe") == [
        "probe.py:2 takes _metadata from vpr.steps.index",
        "probe.py:4 uses vt._mine_chunk",
    ]

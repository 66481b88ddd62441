"""The pipeline is declared once, in dvc.yaml: complete code dependencies, paths and heads from params.yaml."""

from __future__ import annotations

import ast
from pathlib import Path, PurePosixPath

import networkx as nx
import pytest
import yaml

from tests.test_architecture import import_graph, modules

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def specs():
    from tasks.cache import stage_specs

    return stage_specs(REPO)


def _imports(nodes) -> set[str]:
    return {
        n.module
        for node in nodes
        for n in ast.walk(node)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("vpr")
    }


def stage_modules(group: str) -> set[str]:
    """Every ``vpr`` module a stage's command imports, directly or through other modules: the CLI's and the
    step table's own imports, plus those of the step's binder in ``vpr/pipeline.py`` (and the table's
    functions it calls), so DVC's deps follow the step, not every step."""
    from vpr.pipeline import STEPS

    tree = ast.parse((REPO / "vpr/pipeline.py").read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    step = STEPS[group]
    todo = [f.__name__ for f in (step.run, step.shards) if f is not None]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        todo += [
            c.func.id for c in ast.walk(functions[name]) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
        ]
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    for cli in (
        "vpr/cli/__init__.py",
        "vpr/cli/base.py",
        "vpr/cli/steps.py",
        "vpr/cli/commands.py",
        "vpr/cli/ablation.py",
    ):
        body = ast.parse((REPO / cli).read_text()).body  # what `vpr <step>` imports before the step runs
        top += [n for n in body if isinstance(n, (ast.Import, ast.ImportFrom))]
        top += [n for n in body if isinstance(n, ast.FunctionDef) and n.name == "_step"]
    direct = {
        m for m in _imports([*top, *(functions[f] for f in seen)]) if not m.startswith(("vpr.cli", "vpr.pipeline"))
    }
    graph = import_graph()
    return {"vpr.pipeline"} | direct | {m for d in direct if d in graph for m in nx.descendants(graph, d)}


def covered(path: str, deps: tuple[str, ...]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(d) or PurePosixPath(d) in p.parents for d in deps)


def missing_code_deps(specs) -> dict[str, list[str]]:
    """Per stage, the modules its command imports that its dvc.yaml deps do not cover."""
    files = {name: str(path.relative_to(REPO)) for name, path in modules().items()}
    missing = {}
    for name, spec in specs.items():
        needed = sorted(files[m] for m in stage_modules(name.partition("@")[0]) if m in files)
        lacking = [f for f in needed if not covered(f, spec.deps)]
        if lacking:
            missing[name] = lacking
    return missing


def test_every_stage_depends_on_every_module_its_command_imports(specs):
    missing = missing_code_deps(specs)
    assert not missing, f"dvc.yaml stages miss code dependencies (add them to the stage's deps): {missing}"


def test_a_missing_code_dependency_is_caught(specs):
    """The validation recall that picks train's checkpoint lives in vpr/shared/retrieval.py: drop it, get told."""
    from dataclasses import replace

    broken = dict(specs)
    broken["train@avg"] = replace(
        specs["train@avg"], deps=tuple(d for d in specs["train@avg"].deps if d != "vpr/shared/retrieval.py")
    )
    assert missing_code_deps(broken) == {"train@avg": ["vpr/shared/retrieval.py"]}


def test_paths_come_from_params_and_heads_from_train_heads(specs):
    text = (REPO / "dvc.yaml").read_text()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for folder in ("artifacts/", "metrics/", "reports/", "data"):
        assert not any(line.strip().startswith(f"- {folder}") for line in text.splitlines()), folder
    raw = yaml.safe_load(text)["stages"]
    assert list(raw["train"]["foreach"]) == params["train"]["heads"]
    assert raw["evaluate"]["foreach"] == "${train.heads}"
    trained = [n for n in specs if n.startswith("train@")]
    assert trained == [f"train@{h}" for h in params["train"]["heads"]]


def test_flow_graph_is_dvcs_graph_plus_training_lanes(specs):
    from flows.train_all import lane_order, task_graph
    from vpr.pipeline import STEPS

    assert {name.partition("@")[0] for name in specs} <= set(STEPS)
    dvc_edges = {(s, u) for s, spec in specs.items() for u in spec.upstream}
    assert ("train@crn", "train@netvlad") in dvc_edges and ("shard@test", "ingest") in dvc_edges
    assert ("report", "evaluate@gem") in dvc_edges and ("train@avg", "mine@train") in dvc_edges
    wide = task_graph(specs, lanes=len(specs))
    assert {(s, u) for s, us in wide.items() for u in us} == dvc_edges  # enough lanes: exactly DVC's
    one = task_graph(specs, lanes=1)
    extra = {(s, u) for s, us in one.items() for u in us} - dvc_edges
    assert extra == {(s, u) for s, us in lane_order(specs, 1).items() for u in us} - dvc_edges
    assert all(s.startswith("train@") and u.startswith("train@") for s, u in extra)
    assert nx.is_directed_acyclic_graph(nx.DiGraph(list(extra | dvc_edges)))


def test_data_dependencies_are_as_fine_as_the_splits(specs):
    """New test-split imagery (what re-indexing adds) reaches evaluation, index and report, never training."""
    graph = nx.DiGraph([(u, s) for s, spec in specs.items() for u in spec.upstream])
    below_test = nx.descendants(graph, "shard@test") | nx.descendants(graph, "mine@test")
    heads = yaml.safe_load((REPO / "params.yaml").read_text())["train"]["heads"]
    assert not any(name.startswith(("train@", "shard@", "mine@")) for name in below_test)
    assert {f"evaluate@{h}" for h in heads} | {"baseline", "index", "report"} <= below_test
    for head in heads:
        deps = specs[f"train@{head}"].deps
        assert not any("test" in d for d in deps), deps  # training never reads the test split
    assert "data/images/test" in specs["shard@test"].deps and "data" not in specs["shard@test"].deps


def test_every_path_the_step_table_writes_is_the_dvc_out_and_back(specs):
    """vpr.foundations.layout (through each step's ``outputs``) and dvc.yaml name the same files, stage by stage."""
    from vpr.foundations.config import load_config
    from vpr.foundations.layout import Layout
    from vpr.pipeline import STEPS, stage_outputs

    cfg = load_config(REPO / "params.yaml")
    layout = Layout.from_config(cfg, REPO)
    assert {name.partition("@")[0] for name in specs} == set(STEPS)
    for name, spec in specs.items():
        ours = sorted(p.relative_to(REPO).as_posix() for p in stage_outputs(name, cfg, layout))
        assert ours == sorted(spec.outs), name

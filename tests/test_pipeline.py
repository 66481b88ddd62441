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


def command_modules(subcommand: str) -> set[str]:
    """Every ``vpr`` module the CLI sub-command imports, directly or through other modules."""
    cli = ast.parse((REPO / "vpr/cli.py").read_text())
    func = next(n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name == subcommand)
    direct = {n.module for n in ast.walk(func) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("vpr.")}
    graph = import_graph()
    return direct | {m for d in direct if d in graph for m in nx.descendants(graph, d)}


def covered(path: str, deps: tuple[str, ...]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(d) or PurePosixPath(d) in p.parents for d in deps)


def missing_code_deps(specs) -> dict[str, list[str]]:
    """Per stage, the modules its command imports that its dvc.yaml deps do not cover."""
    files = {name: str(path.relative_to(REPO)) for name, path in modules().items()}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, spec in specs.items():
        raw = stages[name.partition("@")[0]]
        subcommand = (raw.get("do") or raw)["cmd"].split()[1]
        needed = sorted(files[m] for m in command_modules(subcommand) if m in files)
        lacking = [f for f in needed if not covered(f, spec.deps)]
        if lacking:
            missing[name] = lacking
    return missing


def test_every_stage_depends_on_every_module_its_command_imports(specs):
    missing = missing_code_deps(specs)
    assert not missing, f"dvc.yaml stages miss code dependencies (add them to the stage's deps): {missing}"


def test_a_missing_code_dependency_is_caught(specs):
    """The validation recall that picks train's checkpoint lives in vpr/retrieval.py: drop it, get told."""
    from dataclasses import replace

    broken = dict(specs)
    broken["train@avg"] = replace(
        specs["train@avg"], deps=tuple(d for d in specs["train@avg"].deps if d != "vpr/retrieval.py")
    )
    assert missing_code_deps(broken) == {"train@avg": ["vpr/retrieval.py"]}


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
    from flows.train_all import STAGE_TASKS, lane_order, task_graph

    assert {name.partition("@")[0] for name in specs} <= set(STAGE_TASKS)
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

"""Content-keyed caching: a task's cache key is what DVC compares for the matching stage.

The stage's dependencies, params and outputs are read from ``dvc.yaml`` through DVC's own parser
(foreach stages resolved), so Prefect and DVC agree on what a step depends on without a second list:

* every dependency path (data, upstream outputs, the ``vpr`` source files the stage names) is hashed
  by content (SHA-256 of each file, directories walked in sorted order); a file's hash is remembered
  across processes while its inode, size, mtime and ctime are unchanged (``tasks.filehashes``), so a
  cached re-run reads file metadata, not file contents;
* every params key of the stage (``train``, ``shards.height``...) is taken from the run's validated
  config, so an edit to an unrelated section does not invalidate the step;
* the wrapper's own source (Prefect's ``TASK_SOURCE`` policy) is part of the key too.

A stage that ``dvc.yaml`` does not define gets no key at all (never cached), rather than a key that
would ignore its inputs.

Tensors and other objects never enter the key: tasks receive paths and the config only.

A cache hit must not hide deleted outputs: ``outputs_present`` lets the flow force a refresh when a
stage's outputs are missing on disk (``refresh_cache=True``), in which case the step runs again and
its new result replaces the cache record under the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy, TaskSource
from prefect.context import TaskRunContext

from tasks.filehashes import file_hashes
from vpr.foundations.atomic import write_text_atomic


@dataclass(frozen=True)
class StageSpec:
    """One DVC stage as the cache sees it (paths relative to the project root)."""

    name: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]
    upstream: tuple[str, ...] = ()  # the stages whose outputs it reads (DVC's own graph)


# --------------------------------------------------------------------------- dvc.yaml

_SPECS: dict[tuple[str, str], dict[str, StageSpec]] = {}
_SPECS_LOCK = threading.Lock()
SPECS_DIR = "vpr-stage-specs"  # under $PREFECT_HOME: the stages parsed by earlier processes
_KEEP_SPECS = 32  # files kept there, the most recently written


def stage_specs(root: str | Path) -> dict[str, StageSpec]:
    """Every stage of ``ROOT/dvc.yaml`` by its name (``train@netvlad``), in file order; {} without dvc.yaml.

    DVC's parser takes a second or more (most of it reading ``dvc.lock`` through a pure-Python YAML
    parser, which the stage list does not need): what it returned is kept in ``$PREFECT_HOME/vpr-stage-specs``
    for the next process, keyed by the bytes of ``dvc.yaml`` and ``params.yaml`` (what it interpolates),
    DVC's version and this module's source. Not kept when ``dvc.yaml`` names ``vars`` (other files it
    would interpolate from).
    """
    root = Path(root).resolve()
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.exists():
        return {}
    params = root / "params.yaml"  # dvc.yaml interpolates paths and foreach lists from it
    text = dvc_yaml.read_bytes() + b"\0" + (params.read_bytes() if params.exists() else b"")
    memo_key = (str(root), hashlib.sha256(text).hexdigest())
    with _SPECS_LOCK:
        if memo_key in _SPECS:
            return _SPECS[memo_key]
        kept = None if b"vars" in dvc_yaml.read_bytes() else _kept_specs_file(root, text)
        specs = read_specs(kept) if kept is not None else None
        if specs is None:
            specs = parse_specs(root)
            if kept is not None:
                keep_specs(kept, specs)
        _SPECS[memo_key] = specs
        return specs


def parse_specs(root: Path) -> dict[str, StageSpec]:
    """The stages of ``ROOT/dvc.yaml`` as DVC's own parser and graph give them (foreach stages resolved)."""
    from dvc.repo import Repo  # heavy import, only when a key is computed

    dvc_yaml = root / "dvc.yaml"
    specs: dict[str, StageSpec] = {}
    with Repo(str(root), uninitialized=True) as repo:
        graph = repo.index.graph  # edges: stage → the stages whose outputs it depends on
        for stage in repo.index.stages:
            if Path(stage.path).resolve() != dvc_yaml:  # e.g. data.dvc, nested dvc.yaml files
                continue
            upstream = tuple(s.name for s in graph.successors(stage) if Path(s.path).resolve() == dvc_yaml)
            deps, params = [], []
            for dep in stage.deps:
                keys = getattr(dep, "params", None)
                if keys is not None:
                    params += list(keys) if not isinstance(keys, dict) else list(keys)
                else:
                    deps.append(dep.def_path)
            specs[stage.name] = StageSpec(
                stage.name, tuple(deps), tuple(params), tuple(o.def_path for o in stage.outs), upstream
            )
    return specs


def _kept_specs_file(root: Path, text: bytes) -> Path:
    import dvc
    from prefect.settings import get_current_settings

    digest = hashlib.sha256(b"stage-specs-v1\0" + dvc.__version__.encode() + b"\0" + Path(__file__).read_bytes())
    digest.update(b"\0" + str(root).encode() + b"\0" + text)
    return Path(get_current_settings().home).expanduser() / SPECS_DIR / f"{digest.hexdigest()}.json"


def read_specs(path: Path) -> dict[str, StageSpec] | None:
    """The stages kept in ``path``; None if there are none (or the file is not what ``keep_specs`` writes)."""
    try:
        rows = json.loads(path.read_text())
        return {row[0]: StageSpec(row[0], *(tuple(str(x) for x in col) for col in row[1:5])) for row in rows}
    except (OSError, ValueError, TypeError, IndexError):
        return None


def keep_specs(path: Path, specs: dict[str, StageSpec]) -> None:
    """Write the stages for the next process (atomically), keeping only the ``_KEEP_SPECS`` newest files."""
    rows = [[s.name, list(s.deps), list(s.params), list(s.outs), list(s.upstream)] for s in specs.values()]
    try:
        write_text_atomic(path, json.dumps(rows))
        files = sorted(path.parent.glob("*.json"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
        for old in files[_KEEP_SPECS:]:
            old.unlink(missing_ok=True)
    except OSError:  # only ever a shortcut: the next process parses again
        pass


def stage_spec(root: str | Path, name: str) -> StageSpec | None:
    return stage_specs(root).get(name)


# --------------------------------------------------------------------------- content hashing


def hash_file(path: Path) -> str:
    """SHA-256 of a file's bytes, remembered across processes while its metadata is unchanged
    (``tasks.filehashes``)."""
    return file_hashes().sha256(path)


# Written by DVC itself beside the outputs it tracks (``dvc commit`` lists them in the parent folder's
# .gitignore): not data, so a folder dependency holding other stages' outputs keeps its key.
_NOT_DATA = frozenset({".gitignore"})


def hash_path(path: str | Path) -> str:
    """Content hash of a file or a directory tree (relative names + file hashes); 'missing' if absent."""
    path = Path(path)
    if path.is_file():
        return hash_file(path)
    if not path.is_dir():
        return "missing"
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        files += [Path(dirpath) / name for name in sorted(set(filenames) - _NOT_DATA)]
    digest = hashlib.sha256()
    for f, value in zip(files, file_hashes().many(files), strict=True):
        digest.update(f.relative_to(path).as_posix().encode() + b"\0" + value.encode() + b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------- params

_MISSING = object()


def param_value(cfg: Any, dotted: str) -> Any:
    """The value of a dotted params key (``shards.height``) in the run's config (None if absent)."""
    value: Any = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg
    for part in dotted.split("."):
        value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            return None
    return value


# --------------------------------------------------------------------------- keys


def stage_key(root: str | Path, name: str, cfg: Any) -> str | None:
    """Hash of the stage's dependency contents and params values; None if dvc.yaml lacks the stage."""
    root = Path(root).resolve()
    spec = stage_spec(root, name)
    if spec is None:
        return None
    record = {
        "root": str(root),
        "stage": name,
        "deps": {d: hash_path(root / d) for d in spec.deps},
        "params": {p: param_value(cfg, p) for p in spec.params},
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def outputs_present(root: str | Path, name: str) -> bool:
    """Whether every output of the stage exists (a cache hit without its files would be a lie)."""
    spec = stage_spec(root, name)
    if spec is None:
        return False
    return all((Path(root) / o).exists() for o in spec.outs)


@dataclass
class StageInputs(CachePolicy):
    """Cache key = content of the DVC stage's deps + its params values + the task's source.

    ``stage`` is a template formatted with the task's inputs (``"train@{head}"``); the task must take
    ``cfg`` (the validated config) and ``root`` (project folder) parameters.
    """

    stage: str = ""
    inputs: tuple[str, ...] = ()  # task inputs that are part of the key too (e.g. one shard of the stage's)

    def __post_init__(self) -> None:
        if not self.stage:  # the base class's first field is key_storage: pass stage= by keyword
            raise ValueError("StageInputs needs stage=... (a dvc.yaml stage name template)")

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        name = self.stage.format(**inputs)
        key = stage_key(inputs["root"], name, inputs["cfg"])
        if key is None:
            return None
        source = TaskSource().compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        extra = json.dumps([inputs.get(name) for name in self.inputs], default=str)
        return hashlib.sha256(f"{key}:{source}:{extra}".encode()).hexdigest()

"""Beside the reference codebase: this pipeline and deep-visual-geo-localization-benchmark on one city.

The reference (gmberton/deep-visual-geo-localization-benchmark, written at e974667) is a local checkout
that the user fetched; nothing of it is copied into this repository. ``--reference PATH`` names it;
this script copies it to a temporary folder, applies the few patches it needs to run on today's
libraries, offline, on the CPU (``PATCHES``: named string replacements, each failing loudly when its
target is not found), prints them, and runs both systems on the same synthetic city (params.yaml's
default city, rendered once into ``$VPR_BENCH_CACHE``) with the same settings: ResNet-18 cut after
layer3 from random weights, NetVLAD, partial mining, positives by distance only, fp32, 0 workers.

What each timing is: wall time of one process (or, for ours, one ``vpr`` command) from its start to
its exit, as a user would run it, and the peak RSS of its process tree (sampled).
  ours, train:      ``vpr train --head netvlad`` on a project that ``vpr ingest``/``shard``/``mine``
                    prepared beforehand (those are timed apart, as preparation, and not counted). Cold:
                    no ``artifacts/trunk-cache``, so the run encodes the frozen layers of every train/val
                    image first; warm: the same run again with the trunk cache of the cold run present
                    (models, descriptors and metrics removed). Includes k-means initialisation of
                    NetVLAD and the per-epoch validation.
  reference, train: ``python train.py``: reads the JPEG folders and builds its datasets (train, val,
                    test), k-means initialisation, the epochs with their validation, and, as its
                    train.py ends, the test-split evaluation of its best model.
  test evaluation:  ours ``vpr evaluate --head netvlad`` (encode the test split, exact search,
                    Recall@N, predictions table), reference ``python eval.py --resume best_model.pth``,
                    each on the model of its longest training run.
Recall@1/5/10/20 on the test split: ours from ``metrics/netvlad.json``, the reference's from its log
(``Recalls on < ... >`` of train.py and eval.py).

The reference's Python needs scikit-learn (not a dependency of this project): ``--reference-deps DIR``
(default ``$VPR_BENCH_CACHE/peer-deps``) is put on its PYTHONPATH, e.g. after
``python -m pip install --target DIR --no-deps 'scikit-learn<1.7' joblib threadpoolctl`` (1.7 and later
also want narwhals).

    .venv/bin/python bench/peer.py --reference ~/src/deep-visual-geo-localization-benchmark --quick
    .venv/bin/python bench/peer.py --reference ~/src/deep-visual-geo-localization-benchmark
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import _common
import psutil
import yaml


@dataclass(frozen=True)
class Patch:
    name: str
    file: str
    old: str
    new: str
    why: str


PATCHES = (
    Patch(
        "random-init",
        "model/network.py",
        "torchvision.models.resnet18(pretrained=True)",
        "torchvision.models.resnet18(weights=None)",
        "offline: random weights instead of downloading ImageNet's (our side: model.weights none); "
        "torchvision 0.13+ also dropped pretrained=",
    ),
    Patch(
        "optional-transformers",
        "model/network.py",
        "from transformers import ViTModel\n",
        "try:\n    from transformers import ViTModel\nexcept ImportError:  # only the ViT backbone needs it\n"
        "    ViTModel = None\n",
        "transformers is not installed; only the ViT backbone uses it",
    ),
    Patch(
        "optional-gdrive-network",
        "model/network.py",
        "from google_drive_downloader import GoogleDriveDownloader as gdd\n",
        "try:\n    from google_drive_downloader import GoogleDriveDownloader as gdd\nexcept ImportError:\n"
        "    gdd = None\n",
        "googledrivedownloader is not installed; only Places/GLDv2 weights are downloaded with it",
    ),
    Patch(
        "optional-gdrive-eval",
        "eval.py",
        "from google_drive_downloader import GoogleDriveDownloader as gdd\n",
        "try:\n    from google_drive_downloader import GoogleDriveDownloader as gdd\nexcept ImportError:\n"
        "    gdd = None\n",
        "likewise in eval.py (only off-the-shelf Naver weights)",
    ),
    Patch(
        "optional-cct",
        "model/network.py",
        "from model.cct import cct_14_7x2_384\n",
        "try:\n    from model.cct import cct_14_7x2_384\nexcept ImportError:  # CCT needs timm\n"
        "    cct_14_7x2_384 = None\n",
        "timm is not installed; only the CCT backbone uses it",
    ),
    Patch(
        "optional-torchscan",
        "util.py",
        "import torchscan\n",
        "try:\n    import torchscan\nexcept ImportError:\n    torchscan = None\n",
        "torchscan is not installed; it only counts FLOPs for a log line",
    ),
    Patch(
        "flops-without-torchscan",
        "util.py",
        "    module_info = torchscan.crawl_module(",
        "    if torchscan is None:\n        return 'FLOPs not counted (no torchscan)'\n"
        "    module_info = torchscan.crawl_module(",
        "the FLOPs log line without torchscan",
    ),
    Patch(
        "numpy2-ragged-delete",
        "datasets_ws.py",
        "self.hard_positives_per_query = list(knn.radius_neighbors(",
        "self.hard_positives_per_query = (knn.radius_neighbors(",
        "numpy >= 1.24 refuses np.delete on a list of unequal arrays: keep scikit-learn's object array",
    ),
    Patch(
        "numpy2-in1d",
        "test.py",
        "np.in1d(",
        "np.isin(",
        "np.in1d is gone from numpy 2.4",
    ),
    Patch(
        "torch26-load-train",
        "train.py",
        'torch.load(join(args.save_dir, "best_model.pth"))',
        'torch.load(join(args.save_dir, "best_model.pth"), weights_only=False)',
        "torch >= 2.6 loads weights only by default; the checkpoint holds numpy recalls",
    ),
    Patch(
        "torch26-load-resume",
        "util.py",
        "torch.load(args.resume, map_location=args.device)",
        "torch.load(args.resume, map_location=args.device, weights_only=False)",
        "likewise for eval.py --resume",
    ),
    Patch(
        "netvlad-init-small-maps",
        "model/aggregation.py",
        "np.random.choice(image_descriptors.shape[1], descs_num_per_image, replace=False)",
        "np.random.choice(image_descriptors.shape[1], descs_num_per_image, "
        "replace=image_descriptors.shape[1] < descs_num_per_image)",
        "120x160 images give 8x10 = 80 local features, fewer than the 100 per image its k-means init "
        "draws without replacement: draw with replacement then",
    ),
)

REFERENCE_MODULES = ("faiss", "sklearn", "tqdm", "PIL", "torchvision")


def apply_patches(src: Path, dest: Path, patches=PATCHES) -> list[Patch]:
    """Copy the checkout ``src`` (without .git and logs) to ``dest`` and patch the copy.

    Every patch must find its target string in its file, or this fails naming the patch.
    """
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".git", "logs", "test", "__pycache__"))
    for p in patches:
        path = dest / p.file
        if not path.exists():
            raise SystemExit(f"patch {p.name}: {p.file} is not in {src} (is it the reference checkout?)")
        text = path.read_text()
        if p.old not in text:
            raise SystemExit(
                f"patch {p.name}: {p.file} of {src} has no {p.old!r}; the checkout differs from the one "
                "these patches were written for (e974667)"
            )
        path.write_text(text.replace(p.old, p.new))
    return list(patches)


# --------------------------------------------------------------------------- measuring a process


@dataclass
class Run:
    label: str
    seconds: float
    peak_mb: float
    output: str


def measure(label: str, cmd: list[str], cwd: Path, env: dict, log: Path) -> Run:
    """Run ``cmd``; wall time from its start to its exit, peak RSS of its process tree (sampled)."""
    peak = [0]
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            try:
                root = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                return
            while not done.is_set():
                total = 0
                try:
                    for p in [root, *root.children(recursive=True)]:
                        try:
                            total += p.memory_info().rss
                        except psutil.NoSuchProcess:
                            pass
                except psutil.NoSuchProcess:
                    return
                peak[0] = max(peak[0], total)
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    output = log.read_text()
    if rc != 0:
        sys.stderr.write(output[-6000:])
        raise SystemExit(f"{label} failed (exit {rc}): {' '.join(cmd)}; output in {log}")
    print(f"  {label}: {seconds:.1f} s, peak RSS {peak[0] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    return Run(label, seconds, peak[0] / 2**20, output)


# --------------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class Settings:
    queries: int = 200
    refresh: int = 100
    negative_sample: int = 500
    negatives: int = 10
    batch: int = 4
    lr: float = 3e-4
    clusters: int = 16
    height: int = 120
    width: int = 160
    city: float = 1.0

    def line(self) -> str:
        return (
            f"NetVLAD {self.clusters} clusters, images {self.height}x{self.width}, {self.queries} queries per "
            f"epoch, cache refresh every {self.refresh}, {self.negative_sample} sampled negatives, "
            f"{self.negatives} negatives per query, batch {self.batch} queries, lr {self.lr:g}, fp32, "
            "partial mining, positives by distance only, 0 workers, CPU, random init"
        )


QUICK = Settings(queries=20, refresh=10, negative_sample=100, negatives=4, city=0.1)


def our_params(s: Settings, epochs: int) -> dict:
    raw = yaml.safe_load((_common.ROOT / "params.yaml").read_text())
    raw["model"].update(weights="none", netvlad_clusters=s.clusters)
    raw["shards"].update(height=s.height, width=s.width)
    raw["mining"]["train_positive_heading_deg"] = None
    raw["train"].update(
        heads=["netvlad"],
        epochs=epochs,
        per_head={},
        queries_per_epoch=s.queries,
        refresh_every=s.refresh,
        negative_sample=s.negative_sample,
        negatives=s.negatives,
        batch_queries=s.batch,
        lr=s.lr,
        mining="partial",
        precision="fp32",
        workers=0,
        device="cpu",
        seed=0,
    )
    raw["evaluate"]["test_sets"] = []
    return raw


def reference_args(s: Settings, datasets: Path, epochs: int, save_dir: str) -> list[str]:
    return [
        f"--datasets_folder={datasets}",
        "--dataset_name=city",
        "--backbone=resnet18conv4",
        "--aggregation=netvlad",
        f"--netvlad_clusters={s.clusters}",
        "--resize",
        str(s.height),
        str(s.width),
        f"--queries_per_epoch={s.queries}",
        f"--cache_refresh_rate={s.refresh}",
        f"--neg_samples_num={s.negative_sample}",
        f"--negs_num_per_query={s.negatives}",
        f"--train_batch_size={s.batch}",
        f"--lr={s.lr}",
        "--mining=partial",
        f"--epochs_num={epochs}",
        "--device=cpu",
        "--num_workers=0",
        "--seed=0",
        f"--save_dir={save_dir}",
    ]


RECALLS = re.compile(r"Recalls on < [^>]*>: (R@1: [\d.]+.*)$", re.M)


def reference_recalls(output: str) -> dict[int, float]:
    """Recall@N of the last ``Recalls on < test set >`` line (not the ``val set`` ones)."""
    found = RECALLS.findall(output)
    if not found:
        raise SystemExit("no test recalls in the reference's output")
    rec = {int(n): float(v) for n, v in re.findall(r"R@(\d+): ([\d.]+)", found[-1])}
    print(f"  reference: R@1/5/10/20 {fmt_recall(rec)}", file=sys.stderr, flush=True)
    return rec


def reference_phases(output: str) -> dict[str, float]:
    """Seconds (log resolution: 1 s) of the reference's dataset loading and final test, from its log times."""
    stamps = [
        (datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"), m.group(2))
        for m in re.finditer(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)   (.*)$", output, re.M)
    ]

    def at(prefix: str) -> datetime | None:
        return next((t for t, msg in stamps if msg.startswith(prefix)), None)

    out = {}
    start, loaded = at("Arguments"), at("Test set:")
    if start and loaded:
        out["datasets"] = (loaded - start).total_seconds()
    trained, tested = at("Trained for"), next((t for t, m in stamps if m.startswith("Recalls on <")), None)
    if trained and tested:
        out["final test"] = (tested - trained).total_seconds()
    return out


# --------------------------------------------------------------------------- the two sides


class Ours:
    def __init__(self, work: Path, data: Path, s: Settings, env: dict) -> None:
        self.work, self.data, self.s, self.env = work, data, s, env
        self.prep: dict[str, Run] = {}

    def cli(self, label: str, root: Path, *args: str) -> Run:
        cmd = [sys.executable, "-m", "vpr.cli", "-q", *args]
        return measure(label, cmd, root, self.env, self.work / f"{label.replace(' ', '_')}.log")

    def prepare(self) -> None:
        base = self.work / "ours-base"
        base.mkdir()
        (base / "data").symlink_to(self.data)
        (base / "params.yaml").write_text(yaml.safe_dump(our_params(self.s, 1), sort_keys=False))
        for step in ("ingest", "shard", "mine"):
            self.prep[step] = self.cli(f"ours {step}", base, step)

    def project(self, name: str, epochs: int) -> Path:
        root = self.work / name
        root.mkdir()
        (root / "data").symlink_to(self.data)
        (root / "params.yaml").write_text(yaml.safe_dump(our_params(self.s, epochs), sort_keys=False))
        for part in ("catalog", "shards", "mining"):
            shutil.copytree(self.work / "ours-base" / "artifacts" / part, root / "artifacts" / part)
        return root

    def train(self, label: str, root: Path, *, warm: bool = False) -> Run:
        if warm:  # keep the trunk cache, drop what the training and evaluation wrote
            assert (root / "artifacts" / "trunk-cache").exists(), "no trunk cache to re-use"
            for part in ("artifacts/models", "artifacts/live", "artifacts/descriptors", "artifacts/predictions"):
                shutil.rmtree(root / part, ignore_errors=True)
            shutil.rmtree(root / "metrics", ignore_errors=True)
        else:
            assert not (root / "artifacts" / "trunk-cache").exists()
        return self.cli(label, root, "train", "--head", "netvlad")

    def evaluate(self, label: str, root: Path) -> tuple[Run, dict[int, float]]:
        run = self.cli(label, root, "evaluate", "--head", "netvlad")
        metrics = json.loads((root / "metrics" / "netvlad.json").read_text())
        rec = {n: float(metrics[f"recall@{n}"]) for n in (1, 5, 10, 20) if f"recall@{n}" in metrics}
        print(f"  {label}: R@1/5/10/20 {fmt_recall(rec)}", file=sys.stderr, flush=True)
        return run, rec


class Reference:
    def __init__(self, work: Path, code: Path, data: Path, s: Settings, env: dict) -> None:
        self.work, self.code, self.s, self.env = work, code, s, env
        self.datasets = work / "datasets"
        (self.datasets / "city").mkdir(parents=True)
        (self.datasets / "city" / "images").symlink_to(data / "images")

    def train(self, label: str, epochs: int, save_dir: str) -> tuple[Run, dict[int, float], Path]:
        cmd = [sys.executable, "train.py", *reference_args(self.s, self.datasets, epochs, save_dir)]
        run = measure(label, cmd, self.code, self.env, self.work / f"{save_dir}.log")
        best = max((self.code / "logs" / save_dir).glob("*/best_model.pth"))
        return run, reference_recalls(run.output), best

    def evaluate(self, label: str, model: Path, save_dir: str) -> tuple[Run, dict[int, float]]:
        args = reference_args(self.s, self.datasets, 1, save_dir)
        cmd = [sys.executable, "eval.py", *args, f"--resume={model}"]
        run = measure(label, cmd, self.code, self.env, self.work / f"{save_dir}.log")
        return run, reference_recalls(run.output)


def check_reference_python(env: dict) -> None:
    probe = (
        "import importlib, sys\n"
        "for m in sys.argv[1:]:\n"
        "    try:\n        importlib.import_module(m)\n"
        "    except ImportError as e:\n        print(f'{m} ({e})')"
    )
    missing = subprocess.run(
        [sys.executable, "-c", probe, *REFERENCE_MODULES], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    if missing:
        deps = env.get("PYTHONPATH", "").split(os.pathsep)[0]
        raise SystemExit(
            f"the reference needs {', '.join(missing)}, not importable here; for example:\n"
            f"  {sys.executable} -m pip install --target {deps} --no-deps 'scikit-learn<1.7' joblib threadpoolctl"
        )


# --------------------------------------------------------------------------- main


def fmt_recall(r: dict[int, float]) -> str:
    return " / ".join(f"{r[n]:.1f}" for n in (1, 5, 10, 20) if n in r)


def report(times, recalls, phases, prep: dict[str, Run], eval_row: str, rounds: int) -> None:
    """The tables: seconds and peak RSS per row (medians over rounds) with reference / ours, recalls."""

    def med(runs: list[Run], attr: str) -> float:
        return _common.median([getattr(x, attr) for x in runs])

    print()
    print("| run | ours s | reference s | reference / ours | ours peak RSS MiB | reference peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for row, sides in times.items():
        o, f = med(sides["ours"], "seconds"), med(sides["reference"], "seconds")
        print(
            f"| {row if row != 'test evaluation' else eval_row} | {o:.1f} | {f:.1f} | {f / o:.2f} | "
            f"{med(sides['ours'], 'peak_mb'):.0f} | {med(sides['reference'], 'peak_mb'):.0f} |"
        )
    print()
    print("| test recall R@1 / 5 / 10 / 20 | ours | reference |")
    print("|---|---|---|")
    for e, rec in recalls.items():
        print(f"| after {e} | {fmt_recall(rec['ours'])} | {fmt_recall(rec['reference'])} |")
        if "reference eval.py" in rec:
            print(f"| after {e}, reference's eval.py | | {fmt_recall(rec['reference eval.py'])} |")
    print()
    print(f"ours, preparation (not counted above): {', '.join(f'{k} {v.seconds:.1f} s' for k, v in prep.items())}")
    for e, ph in phases.items():
        detail = ", ".join(f"{k} {v:.0f} s" for k, v in ph.items())
        print(f"reference train {e}, of which (its log's times, 1 s resolution): {detail}")
    print("the reference has no trunk cache: its row (trunk cache already built) repeats its cold run")
    if rounds > 1:
        print(f"medians of {rounds} rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="checkout of the reference codebase")
    parser.add_argument("--reference-deps", type=Path, default=_common.CACHE / "peer-deps")
    parser.add_argument("--epochs", type=int, nargs=2, default=[1, 3], metavar=("SHORT", "LONG"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny settings and city: checks the script")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    s = QUICK if args.quick else Settings()
    short, long_ = args.epochs

    load_before = os.getloadavg()
    cfg, layout = _common.project(s.height, s.width, city=s.city)  # the rendered city (cached)
    work = Path(tempfile.mkdtemp(prefix="vpr-peer-"))
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    ours_env = {**base_env, "PYTHONPATH": str(_common.ROOT)}
    ref_env = {**base_env, "PYTHONPATH": str(args.reference_deps.resolve())}
    check_reference_python(ref_env)
    try:
        code = work / "reference"
        patched = apply_patches(args.reference.resolve(), code)
        commit = subprocess.run(
            ["git", "-C", str(args.reference), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        print(f"# beside the reference — {_common.machine()}")
        print(f"# reference {args.reference} at {commit or '?'}, patched in a temporary copy:")
        for p in patched:
            print(f"#   {p.name} ({p.file}): {p.why}")
        print(f"# city: {layout.data} ({'quick: ' if args.quick else ''}params.yaml's default city x {s.city:g})")
        print(f"# settings: {s.line()}")
        ours = Ours(work, layout.data, s, ours_env)
        ref = Reference(work, code, layout.data, s, ref_env)
        ours.prepare()
        times: dict[str, dict[str, list[Run]]] = {}
        recalls: dict[str, dict[str, dict[int, float]]] = {}
        phases: dict[str, dict[str, float]] = {}

        def put(row: str, side: str, run: Run) -> None:
            times.setdefault(row, {}).setdefault(side, []).append(run)

        for r in range(args.rounds):
            print(f"# round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            e1 = f"{short} epoch{'s' if short > 1 else ''}"
            e3 = f"{long_} epoch{'s' if long_ > 1 else ''}"
            root1 = ours.project(f"ours-e{short}-r{r}", short)
            put(f"{e1}, train (cold)", "ours", ours.train(f"ours train {e1} cold", root1))
            run, rec, _ = ref.train(f"reference train {e1}", short, f"peer-e{short}-r{r}")
            put(f"{e1}, train (cold)", "reference", run)
            recalls.setdefault(e1, {})["reference"] = rec
            phases[e1] = reference_phases(run.output)
            _, rec = ours.evaluate(f"ours evaluate {e1}", root1)
            recalls[e1]["ours"] = rec
            warm = ours.train(f"ours train {e1} warm", root1, warm=True)
            put(f"{e1}, train (trunk cache already built)", "ours", warm)
            put(f"{e1}, train (trunk cache already built)", "reference", times[f"{e1}, train (cold)"]["reference"][-1])
            root3 = ours.project(f"ours-e{long_}-r{r}", long_)
            put(f"{e3}, train (cold)", "ours", ours.train(f"ours train {e3} cold", root3))
            run, rec, best = ref.train(f"reference train {e3}", long_, f"peer-e{long_}-r{r}")
            put(f"{e3}, train (cold)", "reference", run)
            recalls.setdefault(e3, {})["reference"] = rec
            phases[e3] = reference_phases(run.output)
            run, rec = ours.evaluate(f"ours evaluate {e3}", root3)
            put("test evaluation", "ours", run)
            recalls[e3]["ours"] = rec
            run, rec = ref.evaluate(f"reference evaluate {e3}", best, f"peer-eval-r{r}")
            put("test evaluation", "reference", run)
            recalls[e3]["reference eval.py"] = rec
        load_after = os.getloadavg()

        n_test = sum(1 for _ in (layout.data / "images" / "test").rglob("*.jpg"))
        report(times, recalls, phases, ours.prep, f"test evaluation ({n_test} images, {e3} model)", args.rounds)
        load = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"load average before {load(load_before)}, after {load(load_after)}")
    finally:
        if args.keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

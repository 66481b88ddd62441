"""The study's findings beside ours: holds / does not hold / cannot tell at this budget.

A difference counts only when it is larger than the noise of the figures it compares: twice the
standard error of a difference of two recalls over the same ``n`` queries (binomial,
``2·sqrt(2·p·(1−p)/n)``), or, where an ablation ran two seeds, the largest gap between the seeds of
one setting, whichever is larger. Recall@1 is compared (the study's headline figure).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import mean

HOLDS, FAILS, UNSURE = "holds", "does not hold", "cannot tell at this budget"


@dataclass(frozen=True)
class Finding:
    claim: str  # the study's words
    test_set: str  # where the study made it: "test" (Pitts30k) or "other" (St. Lucia: our extra test sets)
    judge: Callable[[dict[str, float], float], tuple[str, str]]  # (R@1 by label, noise) -> (verdict, why)


def _r1(rows: list[dict], test_set: str) -> dict[str, float]:
    """Mean R@1 per setting label over the seeds."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r[test_set]["1"])
    return {k: mean(v) for k, v in by.items()}


def noise(rows: list[dict], test_set: str) -> float:
    """The smallest R@1 difference (points) this ablation can tell from chance on ``test_set``."""
    values = [r[test_set]["1"] / 100 for r in rows]
    p, n = mean(values), min(r["queries"][test_set] for r in rows)
    binomial = 200 * math.sqrt(2 * p * (1 - p) / max(n, 1))
    seeds: dict[str, list[float]] = {}
    for r in rows:
        seeds.setdefault(r["label"], []).append(r[test_set]["1"])
    spread = max((max(v) - min(v) for v in seeds.values() if len(v) > 1), default=0.0)
    return max(binomial, spread)


def best(label: str) -> Callable[[dict[str, float], float], tuple[str, str]]:
    """``label`` gives the highest R@1."""

    def judge(r1: dict[str, float], eps: float) -> tuple[str, str]:
        others = {k: v for k, v in r1.items() if k != label and k != "reference"}
        runner = max(others, key=others.get)
        gap = r1[label] - others[runner]
        why = f"{label} {r1[label]:.1f} vs best other ({runner}) {others[runner]:.1f}"
        return (HOLDS if gap > eps else FAILS if gap < -eps else UNSURE), why

    return judge


def ordered(labels: list[str]) -> Callable[[dict[str, float], float], tuple[str, str]]:
    """R@1 rises along ``labels`` (first lowest)."""

    def judge(r1: dict[str, float], eps: float) -> tuple[str, str]:
        values = [r1[k] for k in labels]
        why = " → ".join(f"{k} {v:.1f}" for k, v in zip(labels, values))  # in the claimed order
        steps = [b - a for a, b in zip(values, values[1:])]
        if values[-1] - values[0] > eps and all(s > -eps for s in steps):
            return HOLDS, why
        if values[0] - values[-1] > eps:
            return FAILS, why
        return UNSURE, why

    return judge


def group_above(high: list[str], low: list[str]) -> Callable[[dict[str, float], float], tuple[str, str]]:
    """The mean R@1 of ``high`` exceeds that of ``low``."""

    def judge(r1: dict[str, float], eps: float) -> tuple[str, str]:
        a, b = mean(r1[k] for k in high), mean(r1[k] for k in low)
        why = f"mean of {', '.join(high)} {a:.1f} vs {', '.join(low)} {b:.1f}"
        return (HOLDS if a - b > eps else FAILS if b - a > eps else UNSURE), why

    return judge


def near(reference: str, labels: list[str]) -> Callable[[dict[str, float], float], tuple[str, str]]:
    """Every one of ``labels`` is within the noise of ``reference``."""

    def judge(r1: dict[str, float], eps: float) -> tuple[str, str]:
        gaps = {k: r1[k] - r1[reference] for k in labels}
        worst = max(gaps, key=lambda k: abs(gaps[k]))
        why = f"largest change {worst} {gaps[worst]:+.1f} from {reference} {r1[reference]:.1f}"
        return (HOLDS if abs(gaps[worst]) <= eps else FAILS), why

    return judge


def above(label: str, reference: str) -> Callable[[dict[str, float], float], tuple[str, str]]:
    def judge(r1: dict[str, float], eps: float) -> tuple[str, str]:
        gap = r1[label] - r1[reference]
        why = f"{label} {r1[label]:.1f} vs {reference} {r1[reference]:.1f}"
        return (HOLDS if gap > eps else FAILS if gap < -eps else UNSURE), why

    return judge


def verdicts(rows: list[dict], findings: list[Finding], other_sets: list[str]) -> list[dict]:
    """Each finding judged on the test set it was made on (``other``: each extra test set)."""
    out = []
    for f in findings:
        for test_set in ["test"] if f.test_set == "test" else other_sets:
            eps = noise(rows, test_set)
            try:
                verdict, why = f.judge(_r1(rows, test_set), eps)
            except KeyError as missing:  # a setting that did not run (its page says why)
                verdict, why = UNSURE, f"{missing} did not run"
            out.append({"claim": f.claim, "test_set": test_set, "verdict": verdict, "why": why, "noise": eps})
    return out


# The study's findings (the authors' full report), as claims on our settings' labels (vpr.steps.study).
FINDINGS: dict[str, list[Finding]] = {
    "lr": [
        Finding(
            "a lower learning rate is better: 1e-5 best (R@1 78.6 / 79.1 / 79.3 for 1e-3 / 1e-4 / 1e-5)",
            "test",
            ordered(["lr=0.001", "lr=0.0001", "lr=1e-05"]),
        )
    ],
    "train-threshold": [
        Finding("a 5 m train positive threshold beats 10–25 m", where, best("train_positive_m=5.0"))
        for where in ("test", "other")
    ],
    "test-threshold": [
        Finding(
            "a larger test threshold raises recall (R@1 65.1 at 10 m, 82.9 at 50 m), retrained per threshold",
            "test",
            ordered([f"test_positive_m={m}" for m in (10.0, 20.0, 30.0, 40.0, 50.0)]),
        )
    ],
    "augmentation": [
        Finding(
            "augmentations change little on the main test set",
            "test",
            near("reference", ["jitter", "flip", "flip+rotate", "erasing", "all"]),
        ),
        Finding("colour jitter helps on the other city", "other", above("jitter", "reference")),
    ],
    "image-scale": [
        Finding(
            "smaller images (0.5, 0.75) give higher recall than 1.0 and 1.25, more so on the other city",
            where,
            group_above(["image_scale=0.5", "image_scale=0.75"], ["image_scale=1.0", "image_scale=1.25"]),
        )
        for where in ("test", "other")
    ],
}

# The seed report's one table (section 4) and the full report's R@1 for the same runs
SEED_LR = {"1e-3": (81.9, 91.8, 94.8, 96.8), "1e-4": (82.2, 93.0, 95.4, 97.1), "1e-5": (83.5, 93.1, 94.3, 97.1)}
FULL_LR_R1 = {"1e-3": 78.6, "1e-4": 79.1, "1e-5": 79.3}
LR_LABELS = {"1e-3": "lr=0.001", "1e-4": "lr=0.0001", "1e-5": "lr=1e-05"}


def _lr_table(rows: list[dict]) -> list[str]:
    """The seed's lr table in its own format, ours (test split, mean over seeds) beside it."""
    lines = ["", "## The seed's table: learning rate (NetVLAD)", ""]
    lines += ["In the seed report's format (tab-separated; its second column says R@2, likely R@5):", "", "```"]
    lines.append("\tR@1\tR@2\tR@10\tR@20\t\tours: R@1\tR@5\tR@10\tR@20\t(seeds)")
    for lr, seed in SEED_LR.items():
        ours = [r for r in rows if r["label"] == LR_LABELS[lr]]
        means = [mean(r["test"][str(n)] for r in ours) for n in (1, 5, 10, 20)] if ours else []
        theirs = "\t".join(f"{v:.1f}" for v in seed)
        mine = "\t".join(f"{v:.1f}" for v in means)
        lines.append(f"lr = {lr}\t{theirs}\t\t{mine}\t({len(ours)})")
    lines += ["```", "", "The full report's R@1 for the same learning rates: "]
    lines[-1] += ", ".join(f"{lr} → {v}" for lr, v in FULL_LR_R1.items()) + "."
    return lines


def write_findings(results: dict[str, tuple[list[dict], list[dict]]], budget: dict, head: str, out) -> object:
    """``README.md``: per ablation, the study's finding beside ours, and the seed's lr table."""
    from pathlib import Path

    from vpr.foundations.atomic import write_text_atomic
    from vpr.foundations.tables import markdown_table

    lines = [
        "# Ablations: the study's findings beside ours",
        "",
        f"Head `{head}`; budget per experiment over the project's params: `{budget}`. A verdict compares "
        "R@1 and counts a difference only beyond the noise (twice the binomial standard error of a difference "
        "over the test set's queries, or the spread between seeds where two ran), so *cannot tell* means this "
        "budget and test-set size cannot resolve it. Each ablation's table, params and Recall@N curves: its page.",
        "",
    ]
    cells = []
    for name, (_, found) in results.items():
        if not found:
            cells.append([f"[{name}]({name}.md)", "— (not in the study)", "—", "—", "—", "—"])
        for v in found:
            cells.append(
                [f"[{name}]({name}.md)", v["claim"], v["test_set"], v["verdict"], v["why"], f"{v['noise']:.1f}"]
            )
    lines += markdown_table(["ablation", "the study found", "on", "ours", "R@1 (ours)", "noise (points)"], cells)
    if "lr" in results:
        lines += _lr_table(results["lr"][0])
    path = Path(out) / "README.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path

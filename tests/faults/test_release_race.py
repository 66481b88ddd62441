"""A release version pruned while a reader is opening it: the reader opens the new live version."""

from __future__ import annotations

import pytest

import vpr.shared.release
from vpr.steps.index import INDEX_FILE, build_release, current_version, load_release

pytestmark = pytest.mark.timeout(180)


def test_a_version_pruned_mid_open_is_reopened_at_the_live_version(released, monkeypatch):
    _, cfg, layout = released
    release_dir = layout.release_dir("avg")
    first = current_version(release_dir)
    real_open = vpr.shared.release.load_version
    opened = []

    def prune_during_open(version, device):
        opened.append(version.name)
        if len(opened) == 1:  # between reading CURRENT and reading the index: a writer publishes and prunes
            build_release("avg", cfg, layout)
            (version / INDEX_FILE).unlink(missing_ok=True)
        return real_open(version, device)

    monkeypatch.setattr(vpr.shared.release, "load_version", prune_during_open)
    release = load_release(release_dir)
    assert current_version(release_dir) != first
    assert opened == [first.name, current_version(release_dir).name] and release.path == current_version(release_dir)
    assert release.index.ntotal == release.ids.height > 0

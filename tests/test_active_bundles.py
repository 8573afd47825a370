"""The service's bundles as one object (edge_runtime/service/active.py), on tiny bundles without the watch loop:
a swap on a re-pointed link, a bundle that does not load, a shadow started and promoted without a second load,
a rollback that re-points the link, and the snapshot /healthz and the MQTT status report."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from edge_runtime.adapt.derive import derive_bundle
from edge_runtime.bundle import load_bundle
from edge_runtime.db.store import Store
from edge_runtime.inspector import Inspector
from edge_runtime.service.active import ActiveBundles
from edge_runtime.service.bundles import repoint
from tests.support.watch import make_config


class FakeRecorder:
    """What ActiveBundles hands the bundles to: counts flushes (a change never splits an open group) and keeps the
    inspector and shadow it was given."""

    def __init__(self):
        self.inspector = self.shadow = None
        self.flushes = 0

    def flush(self):
        self.flushes += 1

    def set_inspector(self, inspector):
        self.inspector = inspector


@pytest.fixture(scope="module")
def two_bundles(tmp_path_factory, tiny_bundle_v2):
    """A (current) and B (the same models, another manifest: another bundle id)."""
    root = tmp_path_factory.mktemp("two")
    a = shutil.copytree(tiny_bundle_v2, root / "A")
    b = derive_bundle(load_bundle(a), root / "B", extra={"source_run": "tests-active-b"})
    return Path(a), Path(b)


@pytest.fixture
def active(two_bundles, folders, tmp_path):
    a, _ = two_bundles
    link = tmp_path / "models"
    os.symlink(a, link)
    cfg = make_config(link, folders, threads=1)
    store = Store(folders["db"])
    recorder = FakeRecorder()
    bundles = ActiveBundles(cfg, store, recorder, Inspector(link, threads=1))
    yield bundles, recorder, link
    store.close()


def bundle_id(path) -> str:
    return load_bundle(path).bundle_id


def test_a_repointed_link_is_swapped_in_and_reported(active, two_bundles):
    bundles, recorder, link = active
    a, b = two_bundles
    assert recorder.inspector is bundles.inspector and bundles.bundle.bundle_id == bundle_id(a)
    assert not bundles.link_repointed()
    repoint(link, b)
    assert bundles.link_repointed()
    flushed = recorder.flushes
    assert bundles.reload() is None
    assert recorder.flushes > flushed                       # the open group is committed on the old bundle
    assert bundles.bundle.bundle_id == bundle_id(b) and recorder.inspector is bundles.inspector
    assert not bundles.link_repointed()
    snap = bundles.snapshot()
    assert snap["current"] == bundle_id(b) and snap["path"] == str(b.resolve())
    assert snap["last_change"]["what"] == "swapped" and snap["last_change"]["bundle_id"] == bundle_id(b)
    assert snap["candidate"] is None and snap["shadow"] is None and snap["error"] is None


def test_a_bundle_that_does_not_load_leaves_the_current_one(active, two_bundles, tmp_path):
    bundles, recorder, link = active
    a, _ = two_bundles
    broken = shutil.copytree(a, tmp_path / "broken")
    (broken / "stage1.tflite").write_bytes(b"damaged")
    repoint(link, broken)
    error = bundles.reload()
    assert error and "sha256 mismatch" in error
    assert bundles.bundle.bundle_id == bundle_id(a) and recorder.inspector is bundles.inspector
    assert not bundles.link_repointed()                     # not retried until the link changes again
    snap = bundles.snapshot()
    assert snap["current"] == bundle_id(a)
    assert snap["error"]["path"] == str(broken.resolve()) and "sha256 mismatch" in snap["error"]["error"]
    assert not bundles.report_error(snap["error"]["path"], snap["error"]["error"])     # already said
    assert bundles.report_error("/elsewhere", "rollout: disk full")
    assert bundles.snapshot()["error"]["error"] == "rollout: disk full"


def test_a_shadow_is_promoted_with_its_own_inspector(active, two_bundles):
    bundles, recorder, link = active
    _, b = two_bundles
    bundles.start_shadow(b, 0.5, source="r-1")
    shadow = bundles.shadow
    assert shadow is not None and recorder.shadow is shadow and shadow.bundle_id == bundle_id(b)
    snap = bundles.snapshot()
    assert snap["candidate"] == bundle_id(b) and snap["shadow"]["images"] == 0
    assert snap["shadow"]["fraction"] == 0.5 and snap["shadow"]["source"] == "r-1"
    assert bundles.promote(b, "rollout r-1") is None
    assert bundles.inspector is shadow.inspector            # no second load of the candidate
    assert bundles.shadow is None and recorder.shadow is None
    assert recorder.inspector is shadow.inspector and bundles.bundle.bundle_id == bundle_id(b)
    assert bundles.snapshot()["candidate"] is None


def test_a_stopped_shadow_leaves_the_current_bundle(active, two_bundles):
    bundles, recorder, _ = active
    a, b = two_bundles
    bundles.start_shadow(b, 1.0)
    bundles.stop_shadow()
    assert bundles.shadow is None and recorder.shadow is None and bundles.bundle.bundle_id == bundle_id(a)
    assert bundles.snapshot()["candidate"] is None


def test_a_rollback_repoints_the_link_once_loaded(active, two_bundles, tmp_path):
    bundles, recorder, link = active
    a, b = two_bundles
    repoint(link, b)
    assert bundles.reload() is None
    assert bundles.roll_back(a, "rollback r-2") is None
    assert os.path.realpath(link) == str(a.resolve()) and bundles.bundle.bundle_id == bundle_id(a)
    assert recorder.inspector is bundles.inspector and not bundles.link_repointed()
    # a rollback to a bundle that does not load leaves both the bundle and the link
    assert bundles.roll_back(tmp_path / "missing", "rollback r-3")
    assert os.path.realpath(link) == str(a.resolve()) and bundles.bundle.bundle_id == bundle_id(a)


def test_the_snapshot_merges_the_rollout_report(active, two_bundles):
    bundles, _, link = active
    _, b = two_bundles
    repoint(link, b)
    bundles.reload()
    swap = bundles.last_swap
    rollout = {"previous": ["p" * 64], "last_change": {"at": "1999-01-01T00:00:00+00:00", "what": "refused"},
               "candidate": {"bundle_id": "c" * 64, "phase": "fetching", "rollout": "r-4", "since": None}}
    snap = bundles.snapshot(rollout)
    assert snap["candidate"] == "c" * 64 and snap["phase"] == "fetching" and snap["rollout"]["rollout"] == "r-4"
    assert snap["previous"] == ["p" * 64]
    assert snap["last_change"] == swap                      # the later of the two changes
    newer = {**rollout, "last_change": {"at": "2999-01-01T00:00:00+00:00", "what": "promoted"}}
    assert bundles.snapshot(newer)["last_change"]["what"] == "promoted"

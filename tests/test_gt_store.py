"""GT cache: prepare-gt end to end, resume after an interruption, refusal of a mismatched store."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_bev_gt import box_coords, make_sample, pose, write_map_json
from zarr.codecs import Crc32cCodec

import bevctl
from bevctl.config import CLASS_SETS, GRID_PRESETS
from bevctl.data import nuscenes_map
from bevctl.data.bev_gt import bev_gt_for_sample
from bevctl.data.records import DatasetIndex
from bevctl.errors import BevctlError
from bevctl.storage import base, gt_store, location
from bevctl.storage.base import DONE, FAILED, TODO, ArraySpec, CompletionLog, SampleStore, is_incomplete
from bevctl.storage.gt_store import GTStore, prepare_gt

DEMO = GRID_PRESETS["demo"]
HDMAP = CLASS_SETS["hdmapnet"]


def make_world(root: Path, n_per_scene: int = 6) -> DatasetIndex:
    """A straight road with dashed dividers and crosswalks; two scenes driving along it."""
    nuscenes_map.clear_caches()
    write_map_json(
        root, "singapore-onenorth",
        lines={"lane_divider": [[(x, 3.5), (x + 3, 3.5)] for x in range(0, 400, 6)],
               "road_divider": [[(0.0, 0.0), (400.0, 0.0)]]},
        polygons={"ped_crossing": [box_coords(x, -7, x + 4, 7) for x in (60, 150, 260)],
                  "road_segment": [box_coords(0, -7, 400, 7)], "lane": [box_coords(0, -7, 400, 0)]},
    )
    samples, scenes = {}, {}
    for s, scene in enumerate(("scene-0001", "scene-0002")):
        tokens = []
        for k in range(n_per_scene):
            tok = f"{scene}-{k:02d}"
            g = pose(0.05 * np.sin(k) + (np.pi if s else 0.0), 40.0 + 9.7 * k + 100 * s, 1.8 - 3.6 * s)
            samples[tok] = make_sample(tok, g, scene=scene, index_in_scene=k, prev=tokens[-1] if tokens else None)
            tokens.append(tok)
        scenes[scene] = tokens
    return DatasetIndex(dataroot=str(root), version="v1.0-test-gt", split_scenes={"train": ["scene-0001"],
                        "val": ["scene-0002"]}, scenes=scenes, samples=samples)


@pytest.fixture()
def world(tmp_path: Path) -> tuple[Path, DatasetIndex]:
    return tmp_path, make_world(tmp_path)


def run(root: Path, index: DatasetIndex, out: Path, **kw) -> gt_store.PrepareSummary:
    kw.setdefault("workers", 0)
    return prepare_gt(root, index.version, kw.pop("grid", DEMO), kw.pop("class_set", HDMAP), out,
                      index=index, progress=False, **kw)


def test_prepare_gt_end_to_end_matches_rasteriser(world: tuple[Path, DatasetIndex]) -> None:
    root, index = world
    out = root / "gt.zarr"
    summary = run(root, index, out, splits=["train", "val"])
    assert (summary.total, summary.done_now, summary.failed, summary.already_done) == (12, 12, 0, 0)
    assert summary.class_fractions["divider"] > 0 and summary.class_fractions["ped_crossing"] > 0
    store = GTStore.open(out, expected_grid=DEMO, expected_classes=HDMAP, expected_version=index.version)
    assert store.tokens == index.scenes["scene-0001"] + index.scenes["scene-0002"]
    for tok in store.tokens:
        assert store.is_done(tok)
        gt = store.get(tok)
        assert gt.shape == DEMO.shape and gt.dtype == np.uint8
        assert np.array_equal(gt, bev_gt_for_sample(root, index.samples[tok], DEMO, HDMAP))
    # the ego drives on the road: a divider is in view and the road edges at |y| = 7 m
    assert (store.get("scene-0001-00") == 3).any() and (store.get("scene-0001-00") == 1).any()
    assert store.get_many(store.tokens[:3]).shape == (3, *DEMO.shape)
    clone = pickle.loads(pickle.dumps(store))  # what a DataLoader worker gets
    assert np.array_equal(clone.get(store.tokens[5]), store.get(store.tokens[5]))
    # rerun: nothing to do
    again = run(root, index, out, splits=["train", "val"])
    assert (again.already_done, again.done_now) == (12, 0)


def test_resume_after_interruption_gives_identical_arrays(world: tuple[Path, DatasetIndex], monkeypatch) -> None:
    root, index = world
    ref_out, out = root / "ref.zarr", root / "gt.zarr"
    run(root, index, ref_out)
    real_task = gt_store._run_task
    calls = {"n": 0}

    def interrupted(items):  # Ctrl-C during the third task, after it wrote one sample
        calls["n"] += 1
        if calls["n"] == 3:
            real_task(items[:1])
            raise KeyboardInterrupt
        return real_task(items)

    monkeypatch.setattr(gt_store, "_run_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(root, index, out, task_size=2)
    monkeypatch.setattr(gt_store, "_run_task", real_task)
    store = SampleStore.open(out, gt_store.KIND)
    status = store.status()
    assert (status == DONE).sum() == 4  # two whole tasks reported; the interrupted one not
    assert (status == TODO).sum() == 8
    # simulate a torn / stale chunk of a sample that is not done: a rerun must rewrite it
    todo = int(np.flatnonzero(status == TODO)[0])
    SampleStore.open(out, gt_store.KIND, mode="r+").array("bev")[todo] = np.full(DEMO.shape, 7, np.uint8)
    summary = run(root, index, out)
    assert (summary.already_done, summary.done_now) == (4, 8)
    ref, got = SampleStore.open(ref_out, gt_store.KIND), SampleStore.open(out, gt_store.KIND)
    assert np.array_equal(ref.array("bev")[:], got.array("bev")[:])
    assert (got.status() == DONE).all()


def test_failed_sample_is_recorded_and_retried(world: tuple[Path, DatasetIndex]) -> None:
    root, index = world
    bad_tok = "scene-0002-03"
    good_pose = index.samples[bad_tok].global_T_ego
    index.samples[bad_tok] = make_sample(bad_tok, np.full((4, 4), np.nan), scene="scene-0002", index_in_scene=3)
    out = root / "gt.zarr"
    summary = run(root, index, out)
    assert (summary.done_now, summary.failed) == (11, 1)
    assert bad_tok in summary.errors[0] and "finite 4x4" in summary.errors[0]
    assert "1 failed" in gt_store.format_summary(summary)
    store = GTStore.open(out)
    assert store.status()[store.tokens.index(bad_tok)] == FAILED and not store.is_done(bad_tok)
    with pytest.raises(BevctlError, match=f"sample '{bad_tok}' is not prepared yet \\(failed\\)"):
        store.get(bad_tok)
    assert len(store.done_tokens) == 11
    index.samples[bad_tok] = make_sample(bad_tok, good_pose, scene="scene-0002", index_in_scene=3)
    again = run(root, index, out)
    assert (again.already_done, again.done_now, again.failed) == (11, 1, 0)
    assert not store.is_done(bad_tok)  # status as of opening ...
    store.refresh()
    assert store.is_done(bad_tok) and store.get(bad_tok).shape == DEMO.shape


def test_process_pool_matches_in_process(world: tuple[Path, DatasetIndex]) -> None:
    root, index = world
    run(root, index, root / "a.zarr", workers=0)
    summary = run(root, index, root / "b.zarr", workers=2, task_size=3)
    assert (summary.done_now, summary.workers) == (12, 2)
    a, b = GTStore.open(root / "a.zarr"), GTStore.open(root / "b.zarr")
    assert np.array_equal(a.get_many(a.tokens), b.get_many(b.tokens))


def test_store_for_other_grid_classes_or_samples_is_refused(world: tuple[Path, DatasetIndex]) -> None:
    root, index = world
    out = root / "gt.zarr"
    run(root, index, out, splits=["train"])
    with pytest.raises(BevctlError, match=r"gt\.zarr: store was made for grid\..*use --overwrite"):
        run(root, index, out, splits=["train"], grid=GRID_PRESETS["hdmapnet"])
    with pytest.raises(BevctlError, match=r"store was made for class_set\."):
        run(root, index, out, splits=["train"], class_set=CLASS_SETS["markings"])
    with pytest.raises(BevctlError, match=r"store was made for dataset\.splits"):
        run(root, index, out, splits=["train", "val"])
    with pytest.raises(BevctlError, match=r"store was made for grid\."):
        GTStore.open(out, expected_grid=GRID_PRESETS["hdmapnet"])
    with pytest.raises(BevctlError, match=r"store was made for class_set\."):
        GTStore.open(out, expected_classes=CLASS_SETS["markings"])
    with pytest.raises(BevctlError, match=r"dataset\.version"):
        GTStore.open(out, expected_version="v1.0-trainval")
    with pytest.raises(BevctlError, match="no ground truth for sample 'nope'"):
        GTStore.open(out).get("nope")
    # the same class set from a YAML file is the same store
    yaml_cs = root / "hdmapnet.yaml"
    yaml_cs.write_text("name: hdmapnet\nclasses: [boundary, ped_crossing, divider]\nline_width_m: 0.3\nlayers:\n"
                       "  divider: {lines: [road_divider, lane_divider]}\n  ped_crossing: {polygons: [ped_crossing]}\n"
                       "  boundary: {outline: [road_segment, lane]}\n")
    assert run(root, index, out, splits=["train"], class_set=gt_store.resolve_class_set(str(yaml_cs))).already_done == 6
    yaml_cs.write_text(yaml_cs.read_text().replace("0.3", "0.2"))
    with pytest.raises(BevctlError, match=r"class_set\.line_width_m=0\.3, expected 0\.2"):
        run(root, index, out, splits=["train"], class_set=gt_store.resolve_class_set(str(yaml_cs)))
    # --overwrite rebuilds it for the new settings
    summary = run(root, index, out, splits=["train"], class_set=CLASS_SETS["markings"], overwrite=True)
    assert summary.done_now == 6
    assert GTStore.open(out, expected_classes=CLASS_SETS["markings"]).class_set == CLASS_SETS["markings"]


def test_cli_prepare_gt_on_synthetic_world(tiny_synth: tuple[Path, str], tmp_path: Path) -> None:
    dataroot, version = tiny_synth
    out = tmp_path / "gt.zarr"
    env = {**os.environ, "BEVCTL_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "bevctl.cli", "prepare-gt", "--dataroot", str(dataroot), "--version", version,
               "--out", str(out), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    first = cli("--grid", "demo", "--classes", "hdmapnet", "--workers", "0")
    assert first.returncode == 0, first.stderr
    assert "8 samples, 0 already done, 8 rasterised now, 0 failed" in first.stdout
    store = GTStore.open(out, expected_grid=DEMO, expected_classes=HDMAP, expected_version=version)
    assert all(store.is_done(t) for t in store.tokens) and any(store.get(t).any() for t in store.tokens)
    again = cli("--grid", "demo", "--classes", "hdmapnet")
    assert again.returncode == 0 and "8 already done, 0 rasterised now" in again.stdout
    refused = cli("--grid", "hdmapnet", "--classes", "hdmapnet")
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr  # one line, no traceback
    assert "store was made for grid." in refused.stderr and "--overwrite" in refused.stderr
    bad = cli("--grid", "demo", "--classes", "nope")
    assert bad.returncode == 2 and "error: unknown class set 'nope'" in bad.stderr


def test_base_store_creation_is_atomic_and_guarded(tmp_path: Path) -> None:
    spec = [ArraySpec("x", (2, 4, 4), "uint8", (1, 4, 4))]
    path = tmp_path / "s.zarr"
    store = SampleStore.create(path, "t", {"a": (1, 2)}, ["p", "q"], spec)
    codec = store.array("x").compressors[0]
    assert (codec.cname.value, codec.clevel, codec.shuffle.value) == ("zstd", 5, "bitshuffle")
    assert store.metadata == {"a": [1, 2]} and store.counts() == {"todo": 2, "done": 0, "failed": 0}
    with pytest.raises(BevctlError, match="already exists"):
        SampleStore.create(path, "t", {}, ["p", "q"], spec)
    other = tmp_path / "not_a_store"
    other.mkdir()
    with pytest.raises(BevctlError, match="exists and is not a Zarr store"):
        SampleStore.open_or_create(other, "t", {}, ["p"], [])
    with pytest.raises(BevctlError, match="is a 't' store, expected a 'bev_gt' store"):
        GTStore.open(path)
    store.mark([1], DONE)
    again, created = SampleStore.open_or_create(path, "t", {"a": [1, 2]}, ["p", "q"], spec)
    assert not created and list(again.todo_indices()) == [0]
    fresh, created = SampleStore.open_or_create(path, "t", {"a": 3}, ["r"], [ArraySpec("x", (1, 4, 4), "uint8", (1, 4, 4))],
                                                overwrite=True)
    assert created and fresh.tokens == ["r"] and fresh.counts()["todo"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_store", "s.zarr"]  # no temp dirs left


def test_base_store_on_object_storage_is_built_in_place_and_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """On object storage (fsspec memory://, no rename) a store is written in place: readable with
    its data once created, marker-free; refused when it exists unless overwritten (which removes
    the old arrays); a prefix holding something else is never deleted; an interrupted creation
    leaves an 'incomplete store' that open refuses and open_or_create rebuilds."""
    root = f"memory://bevctl-test-{uuid.uuid4().hex[:8]}"
    url = f"{root}/s.zarr"
    data = np.arange(32, dtype=np.uint8).reshape(2, 4, 4)
    spec = [ArraySpec("x", (2, 4, 4), "uint8", (1, 4, 4), data=data), ArraySpec("y", (2, 3), "float32", (1, 3))]
    store = SampleStore.create(url, "t", {"a": (1, 2)}, ["p", "q"], spec, provenance={"host": "h"})
    again = SampleStore.open(url, "t", expected={"a": [1, 2]})
    assert again.tokens == ["p", "q"] and again.metadata == {"a": [1, 2]} and again.counts()["todo"] == 2
    assert np.array_equal(again.array("x")[:], data) and store.info["provenance"] == {"host": "h"}
    attrs = json.loads(location.read_bytes(f"{url}/zarr.json"))["attributes"]
    assert set(attrs) == {"bevctl"} and not base.is_incomplete(url)
    with pytest.raises(BevctlError, match=rf"^{url} already exists \(use --overwrite to replace it\)$"):
        SampleStore.create(url, "t", {}, ["p", "q"], spec)
    location.write_bytes_atomic(f"{url}/notes/readme.txt", b"left by a user inside the old store")
    fresh = SampleStore.create(url, "u", {"b": 1}, ["r"], [ArraySpec("x", (1, 2), "uint8", (1, 2))], overwrite=True)
    assert fresh.kind == "u" and fresh.tokens == ["r"] and "y" not in fresh.group
    assert sorted(location.listdir(url)) == ["done", "tokens", "x", "zarr.json"]  # the old store is gone whole
    other = f"{root}/notes"
    location.write_bytes_atomic(f"{other}/readme.txt", b"not a store")
    with pytest.raises(BevctlError, match=rf"^{other} exists and is not a Zarr store; refusing to delete it"):
        SampleStore.create(other, "t", {}, ["p"], [], overwrite=True)
    assert location.read_bytes(f"{other}/readme.txt") == b"not a store"

    def crash(*args, **kw):
        raise KeyboardInterrupt

    # an overwrite interrupted while deleting the old store: what is left is no longer a store
    monkeypatch.setattr(location, "remove_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        SampleStore.create(url, "t", {}, ["p"], [], overwrite=True)
    monkeypatch.undo()
    with pytest.raises(BevctlError, match=rf"^{url}: no Zarr store there$"):
        SampleStore.open(url, "u")

    def denied(*args, **kw):
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(base, "_fill", denied)  # a storage fault while writing the arrays: one line naming the store
    with pytest.raises(BevctlError, match=rf"^{root}/denied.zarr: access denied \(403 Forbidden\); check the credentials"):
        SampleStore.create(f"{root}/denied.zarr", "t", {}, ["p"], [])
    monkeypatch.undo()

    broken = f"{root}/broken.zarr"
    monkeypatch.setattr(base, "_fill", crash)
    with pytest.raises(KeyboardInterrupt):
        SampleStore.create(broken, "t", {}, ["p"], [])
    monkeypatch.undo()
    assert base.is_incomplete(broken)
    with pytest.raises(base.IncompleteStore, match=r"incomplete store \(its creation was interrupted\)"):
        SampleStore.open(broken, "t")
    rebuilt, created = SampleStore.open_or_create(broken, "t", {}, ["p"], [])
    assert created and rebuilt.tokens == ["p"] and not base.is_incomplete(broken)


def test_store_membership_done_flags_and_long_values_in_mismatch_errors(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "s.zarr", "t", {"grid": {"b": 1, "a": "x" * 200}}, ["p", "q"], [])
    assert "p" in store and "q" in store and "r" not in store and 3 not in store
    store.mark([1], DONE)
    assert not store.is_done("p") and store.is_done("q")
    store.mark([0], FAILED)
    assert not store.is_done("p")
    with pytest.raises(BevctlError, match=r"no sample 'r' in this store"):
        store.is_done("r")
    # a long recorded value is quoted cut to 120 characters (keys sorted), the short one whole
    want = {"grid": {"a": "y", "b": 1}}
    with pytest.raises(BevctlError) as info:
        SampleStore.open(tmp_path / "s.zarr", "t", expected=want)
    msg = str(info.value)
    quoted = '"' + "x" * 116 + "..."
    assert f"store was made for grid.a={quoted}, expected \"y\"; " in msg
    # exactly 120 characters: quoted whole
    SampleStore.create(tmp_path / "s2.zarr", "t", {"k": "z" * 118}, ["p"], [])
    with pytest.raises(BevctlError, match=r"store was made for k=\"z{118}\", expected 1;"):
        SampleStore.open(tmp_path / "s2.zarr", "t", expected={"k": 1})
    SampleStore.create(tmp_path / "s3.zarr", "t", {"k": "z" * 119}, ["p"], [])
    with pytest.raises(BevctlError, match=r"store was made for k=\"z{116}\.\.\., expected 1;"):
        SampleStore.open(tmp_path / "s3.zarr", "t", expected={"k": 1})


def test_reopening_a_store_checks_tokens_and_arrays_with_one_clear_line(tmp_path: Path) -> None:
    """open_or_create on an existing store: the same tokens and arrays (string arrays included)
    reopen it; a different token, a missing array, another shape or another dtype is refused with
    the first difference named and what to do about it."""
    path = tmp_path / "s.zarr"
    spec = [ArraySpec("x", (2, 4, 4), "uint8", (1, 4, 4)), ArraySpec("scene", (2,), "str", (2,), fill_value="")]
    SampleStore.create(path, "t", {"a": 1}, ["p", "q"], spec)
    store, created = SampleStore.open_or_create(path, "t", {"a": 1}, ["p", "q"], spec)
    assert not created and store.tokens == ["p", "q"]
    remedy = "; use --overwrite to rebuild it, or another output path$"
    cases = [
        (["p", "z"], spec, rf"^{path}: sample 1 is 'q' in the store, expected 'z'{remedy}"),
        (["p", "q"], spec + [ArraySpec("y", (2,), "uint8", (2,))], rf"^{path}: array 'y' is missing{remedy}"),
        (["p", "q"], [ArraySpec("x", (2, 4, 5), "uint8", (1, 4, 5))],
         rf"^{path}: array 'x' is uint8\(2, 4, 4\), expected uint8\(2, 4, 5\){remedy}"),
        (["p", "q"], [ArraySpec("x", (2, 4, 4), "float32", (1, 4, 4))],
         rf"^{path}: array 'x' is uint8\(2, 4, 4\), expected float32\(2, 4, 4\){remedy}"),
        (["p", "q"], [ArraySpec("scene", (2,), "uint8", (2,))], rf"^{path}: array 'scene' is .*, expected uint8\(2,\)"),
    ]
    for tokens, arrays, message in cases:
        with pytest.raises(BevctlError, match=message):
            SampleStore.open_or_create(path, "t", {"a": 1}, tokens, arrays)


def test_metadata_mismatch_names_the_first_differing_key(tmp_path: Path) -> None:
    """open_or_create compares the whole recorded metadata: a nested value, a key the store lacks,
    a key the store has in excess, and a dict where a plain value is expected are each named."""
    path = tmp_path / "s.zarr"
    SampleStore.create(path, "t", {"grid": {"res": 0.25, "x": [-16, 16]}, "v": 1}, ["p"], [])
    remedy = "; use --overwrite to rebuild it, or another output path$"
    cases = [
        ({"grid": {"res": 0.5, "x": [-16, 16]}, "v": 1}, r"store was made for grid\.res=0\.25, expected 0\.5"),
        ({"grid": {"res": 0.25, "x": [-16, 16]}, "v": 1, "w": 2}, r'store was made for w="<missing>", expected 2'),
        ({"grid": {"res": 0.25, "x": [-16, 16]}}, r'store was made for v=1, expected "<missing>"'),
        ({"grid": "demo", "v": 1}, r'store was made for grid=\{"res": 0\.25, "x": \[-16, 16\]\}, expected "demo"'),
    ]
    for metadata, message in cases:
        with pytest.raises(BevctlError, match=rf"^{path}: {message}{remedy}"):
            SampleStore.open_or_create(path, "t", metadata, ["p"], [])
    # open() checks only the keys asked for; one the store lacks is named, even when null is expected
    assert SampleStore.open(path, "t", expected={"v": 1}).tokens == ["p"]
    for value, shown in ((2, "2"), (None, "null")):
        with pytest.raises(BevctlError, match=rf'^{path}: store was made for w="<missing>", expected {shown}{remedy}'):
            SampleStore.open(path, "t", expected={"v": 1, "w": value})
    # the caller's own advice replaces the default one
    with pytest.raises(BevctlError, match=rf"^{path}: store was made for v=1, expected 2; evaluate with --grid demo$"):
        SampleStore.open(path, "t", expected={"v": 2}, remedy="evaluate with --grid demo")


def test_only_a_store_marked_as_being_created_counts_as_incomplete(tmp_path: Path) -> None:
    assert not is_incomplete(tmp_path / "missing.zarr")
    for name, text in (("notjson", "{"), ("list", "[1, 2]"), ("plain", '{"attributes": {"other": 1}}'),
                       ("done", '{"attributes": {"bevctl_creating": {}, "bevctl": {}}}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "zarr.json").write_text(text)
        assert not is_incomplete(tmp_path / name), name
    (tmp_path / "creating").mkdir()
    (tmp_path / "creating" / "zarr.json").write_text('{"attributes": {"bevctl_creating": {"kind": "t"}}}')
    assert is_incomplete(tmp_path / "creating")


def test_completion_log_flushes_at_most_every_interval_and_survives_a_full_disk() -> None:
    class Store:
        def __init__(self, fail: OSError | None = None) -> None:
            self.marks: list[tuple[list[int], int]] = []
            self.fail = fail

        def mark(self, indices, status) -> None:
            if self.fail is not None:
                raise self.fail
            self.marks.append((list(indices), status))

    now = [100.0]
    store = Store()
    log = CompletionLog(store, every_s=1.0)
    log._clock = lambda: now[0]
    log._last = now[0]
    log.done(3)
    log.failed(4)
    now[0] += 0.5
    log.tick()
    assert store.marks == []  # not yet: less than every_s since the last flush
    now[0] += 0.6
    log.tick()
    assert store.marks == [([4], FAILED), ([3], DONE)]
    # a full disk while flushing at the end: the records are dropped (redone by the rerun), no new error
    full = CompletionLog(Store(OSError(errno.ENOSPC, "No space left on device")))
    full.done(1)
    full.flush_on_exit()
    other = CompletionLog(Store(OSError(errno.EACCES, "Permission denied")))
    other.done(1)
    with pytest.raises(OSError, match="Permission denied"):
        other.flush_on_exit()


def test_local_store_is_built_beside_its_path_then_renamed_and_a_failed_build_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing parent folders are made; a build that fails midway (here: the disk fills while the
    arrays are written) raises that error and leaves neither a store nor a temp folder behind."""
    nested = tmp_path / "runs" / "a" / "s.zarr"
    store = SampleStore.create(nested, "t", {}, ["p", "q"], [ArraySpec("x", (2, 3), "uint8", (1, 3))])
    assert store.tokens == ["p", "q"] and [p.name for p in nested.parent.iterdir()] == ["s.zarr"]
    real_fill = base._fill

    def fill_then_disk_full(group, tokens, arrays):
        real_fill(group, tokens, arrays)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(base, "_fill", fill_then_disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        SampleStore.create(tmp_path / "other" / "s.zarr", "t", {}, ["p"], [])
    assert list((tmp_path / "other").iterdir()) == []
    with pytest.raises(OSError, match="No space left on device"):  # an overwrite that fails keeps the old store
        SampleStore.create(nested, "u", {}, ["r"], [], overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in nested.parent.iterdir()] == ["s.zarr"]
    assert SampleStore.open(nested, "t").tokens == ["p", "q"]


def test_store_records_are_checksummed_chunked_and_traceable(tmp_path: Path) -> None:
    """What the store's own records promise a reader (bevctl/storage/base.py header, docs/reliability.md):
    every array carries a checksum, ``tokens``/``done`` are one object for up to 65,536 samples (a
    rerun's ``mark`` rewrites one ``done`` object, not one per sample), ``tokens_sha256`` is the
    sha256 of the newline-joined tokens (any tool can check it), and ``provenance`` is recorded."""
    tokens = ["p", "q", "r"]
    specs = [ArraySpec("x", (3, 4), "uint8", (1, 4), dimension_names=("sample", "col")),
             ArraySpec("index_in_scene", (3,), "int32", (3,), fill_value=-1, data=np.array([5, 6, 7], np.int32))]
    store, created = SampleStore.open_or_create(tmp_path / "s.zarr", "t", {"a": 1}, tokens, specs,
                                                provenance={"dataroot": "/data/nuscenes"})
    assert created
    reopened = SampleStore.open(tmp_path / "s.zarr", "t")
    assert reopened.info == {"kind": "t", "format": base.STORE_FORMAT, "bevctl_version": bevctl.__version__,
                             "num_samples": 3, "tokens_sha256": hashlib.sha256(b"p\nq\nr").hexdigest(),
                             "metadata": {"a": 1}, "provenance": {"dataroot": "/data/nuscenes"}}
    assert reopened.array("x").metadata.dimension_names == ("sample", "col")  # what xarray names the axes
    assert reopened.array("index_in_scene")[:].tolist() == [5, 6, 7]  # values known at creation are written
    for name in ("tokens", "done", "x"):
        codecs = reopened.array(name).compressors
        assert any(isinstance(c, Crc32cCodec) or getattr(c, "checksum", False) for c in codecs), (name, codecs)
    assert reopened.array("tokens").chunks == reopened.array("done").chunks == (3,)

    many = [f"{i:032x}" for i in range(70_000)]  # twice nuScenes' 34,149 samples
    big = SampleStore.create(tmp_path / "big.zarr", "t", {}, many, [])
    assert big.array("tokens").chunks == big.array("done").chunks == (65_536,)
    assert SampleStore.open(tmp_path / "big.zarr", "t").tokens == many

    with pytest.raises(ValueError, match="bad status 7"):
        store.mark([0], 7)
    # the store's folder replaced by a file while a job ran: one line naming the store
    shutil.rmtree(tmp_path / "s.zarr")
    (tmp_path / "s.zarr").write_text("not a store")
    with pytest.raises(BevctlError, match=r"^\S*s\.zarr: storage error"):
        store.consolidate()


@pytest.mark.parametrize(("tokens", "spec", "message"), [
    (["p", "q", "p"], [], "duplicate sample tokens given"),
    (["p"], [ArraySpec("tokens", (1,), "uint8", (1,))], "array name 'tokens' is reserved"),
    (["p"], [ArraySpec("done", (1,), "uint8", (1,))], "array name 'done' is reserved"),
    (["p", "q"], [ArraySpec("x", (3, 4), "uint8", (1, 4))], r"array 'x' must have 2 samples on axis 0, got \(3, 4\)"),
    (["p"], [ArraySpec("x", (), "uint8", ())], r"array 'x' must have 1 samples on axis 0, got \(\)"),
])
def test_create_refuses_bad_tokens_and_arrays_with_one_line(tmp_path: Path, tokens, spec, message) -> None:
    with pytest.raises(BevctlError, match=rf"^\S*s\.zarr: {message}$"):
        SampleStore.create(tmp_path / "s.zarr", "t", {}, tokens, spec)
    assert not (tmp_path / "s.zarr").exists()


def test_an_unreadable_done_record_or_a_storage_fault_on_open_is_one_line_naming_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    store = SampleStore.create(path, "t", {}, ["p", "q"], [ArraySpec("x", (2, 3), "uint8", (1, 3))])
    store.mark([0], DONE)
    (path / "done" / "c" / "0").write_bytes(b"not a blosc frame" * 4)  # a damaged completion record
    where = re.escape(str(path))
    with pytest.raises(BevctlError, match=rf"^{where}: the 'done' record does not read \(\w*Error\); "
                                          rf"run bevctl verify {where}$"):
        store.status()

    def timed_out(*args, **kwargs):
        raise OSError(errno.ETIMEDOUT, "Connection timed out")

    monkeypatch.setattr(base.zarr, "open_group", timed_out)  # e.g. a network file system that stalls
    with pytest.raises(BevctlError, match=rf"^{where}: storage error \(TimeoutError: .*Connection timed out\)$"):
        SampleStore.open(path, "t")


def _garble_group_json(path: Path) -> None:
    (path / "zarr.json").write_text("{not json")


def _edit_group_attrs(edit):
    def damage(path: Path) -> None:
        meta = json.loads((path / "zarr.json").read_text())
        meta["attributes"] = edit(meta["attributes"])
        (path / "zarr.json").write_text(json.dumps(meta))

    return damage


def _drop_bevctl_key(key: str):
    return _edit_group_attrs(lambda attrs: {"bevctl": {k: v for k, v in attrs["bevctl"].items() if k != key}})


@pytest.mark.parametrize(("damage", "message"), [
    (_garble_group_json, r"cannot open as a Zarr v3 group \(JSONDecodeError: .+\)"),
    (_edit_group_attrs(lambda attrs: {"bevctl": {**attrs["bevctl"], "format": 99}}),
     r"store format 99 is not supported \(need 1\)"),
    (lambda path: shutil.rmtree(path / "done"), r"incomplete store \(missing 'tokens' or 'done'\)"),
    (lambda path: shutil.rmtree(path / "tokens"), r"incomplete store \(missing 'tokens' or 'done'\)"),
    (lambda path: (path / "tokens" / "c" / "0").write_bytes(b"not a zstd frame"),
     rf"the 'tokens' array does not read \(\w*Error\); run bevctl verify {{path}}"),
    (_edit_group_attrs(lambda attrs: {}), r"not a bevctl store \(no 'bevctl' attributes\)"),
    (_edit_group_attrs(lambda attrs: {"bevctl_creating": {"kind": "t"}}),
     r"incomplete store \(its creation was interrupted\); rerun the command that makes it, or use --overwrite"),
    (lambda path: zarr.open_array(path / "tokens", mode="r+").__setitem__(slice(None), np.array(["p", "p"], dtype=object)),
     r"duplicate sample tokens in the store"),
    (_drop_bevctl_key("kind"), r"is a '\?' store, expected a 't' store"),
    (_drop_bevctl_key("metadata"), r"store was made for v=\"<missing>\", expected 1; use --overwrite to rebuild it, or "
                                   r"another output path"),
], ids=["garbled-zarr.json", "newer-format", "no-done", "no-tokens", "garbled-tokens", "plain-zarr-group",
        "interrupted-creation", "duplicate-tokens", "no-kind", "no-metadata"])
def test_opening_a_damaged_or_foreign_store_is_one_line_naming_it(tmp_path: Path, damage, message) -> None:
    path = tmp_path / "s.zarr"
    SampleStore.create(path, "t", {}, ["p", "q"], [ArraySpec("x", (2, 3), "uint8", (1, 3))])
    damage(path)
    where = re.escape(str(path))
    with pytest.raises(BevctlError, match=f"^{where}: " + message.replace("{path}", where) + "$"):
        SampleStore.open(path, "t", expected={"v": 1})

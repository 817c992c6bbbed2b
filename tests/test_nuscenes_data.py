"""The data layer on the synthetic world: devkit agreement, splits, cache, bad input."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bevctl.data.nuscenes import load_index, parse_splits
from bevctl.data.records import CAMERAS
from bevctl.errors import BevctlError


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BEVCTL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _copy(tiny_synth, tmp_path) -> tuple[Path, str]:
    root, version = tiny_synth
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst, version


def test_index_agrees_with_devkit(tiny_synth, cache_env) -> None:
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion

    root, version = tiny_synth
    index = load_index(root, version)
    nusc = NuScenes(version=version, dataroot=str(root), verbose=False)
    assert len(index.samples) == len(nusc.sample)
    for sample in index.all_samples():
        rec = nusc.get("sample", sample.token)
        assert [c.channel for c in sample.cameras] == list(CAMERAS)
        for cam in sample.cameras:
            sd = nusc.get("sample_data", rec["data"][cam.channel])
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            assert Path(cam.image_path) == Path(nusc.get_sample_data_path(sd["token"])).resolve()
            np.testing.assert_allclose(cam.pix_T_cam, np.array(cs["camera_intrinsic"]))
            np.testing.assert_allclose(
                cam.ego_T_cam, transform_matrix(cs["translation"], Quaternion(cs["rotation"])), atol=1e-12
            )
            np.testing.assert_allclose(
                cam.global_T_ego, transform_matrix(pose["translation"], Quaternion(pose["rotation"])), atol=1e-9
            )
        # the previous sample of the same scene, or None for the first
        assert sample.prev_token == (rec["prev"] or None)
        if sample.prev_token:
            assert index.samples[sample.prev_token].scene_token == sample.scene_token


def test_cameras_have_their_own_ego_pose(tiny_synth, cache_env) -> None:
    index = load_index(*tiny_synth)
    sample = index.all_samples()[1]
    stamps = {c.timestamp for c in sample.cameras}
    poses = {c.global_T_ego.tobytes() for c in sample.cameras}
    assert len(stamps) > 1 and len(poses) > 1, "the six cameras fire at different times"


def test_splits_are_scene_disjoint_in_scene_order(tiny_synth, cache_env) -> None:
    root, version = tiny_synth
    index = load_index(root, version)
    recorded = json.loads((root / version / "bevctl_splits.json").read_text())
    assert {k: sorted(v) for k, v in recorded.items()} == index.split_scenes
    train = index.samples_in("train")
    val = index.samples_in("val")
    assert train and val
    assert not {s.scene_name for s in train} & {s.scene_name for s in val}
    for samples in (train, val):
        for a, b in zip(samples, samples[1:]):
            if a.scene_name == b.scene_name:
                assert b.prev_token == a.token and b.timestamp > a.timestamp
    assert parse_splits("train, val", index) == ["train", "val"]
    with pytest.raises(BevctlError, match="no split 'test'"):
        parse_splits("train,test", index)


def test_index_cache_is_used_and_invalidated(tiny_synth, cache_env, tmp_path, caplog) -> None:
    root, version = _copy(tiny_synth, tmp_path)
    caplog.set_level(logging.INFO, logger="bevctl.data.nuscenes")
    first = load_index(root, version)
    assert "built" in caplog.text
    caplog.clear()
    second = load_index(root, version)
    assert "from cache" in caplog.text
    assert second.split_scenes == first.split_scenes
    for token, s in first.samples.items():
        t = second.samples[token]
        assert t.cameras[2].image_path == s.cameras[2].image_path
        np.testing.assert_array_equal(t.cameras[2].global_T_ego, s.cameras[2].global_T_ego)
    # touching a table invalidates the cache
    table = root / version / "scene.json"
    table.write_text(table.read_text())
    caplog.clear()
    load_index(root, version)
    assert "built" in caplog.text


def test_bad_inputs_name_the_problem(tiny_synth, cache_env, tmp_path) -> None:
    root, version = _copy(tiny_synth, tmp_path)
    with pytest.raises(BevctlError, match="dataroot not found"):
        load_index(tmp_path / "nope", version)
    with pytest.raises(BevctlError, match=r"version folder not found: .*v9\.9"):
        load_index(root, "v9.9")
    # a missing image
    index = load_index(root, version, use_cache=False)
    victim = Path(index.all_samples()[0].cameras[3].image_path)
    victim.unlink()
    with pytest.raises(BevctlError, match=f"image not found: .*{victim.name}"):
        load_index(root, version, use_cache=False)
    # a table record missing a field
    path = root / version / "sample_data.json"
    records = json.loads(path.read_text())
    del records[5]["ego_pose_token"]
    path.write_text(json.dumps(records))
    with pytest.raises(BevctlError, match=r"sample_data\.json: record 5 .*ego_pose_token"):
        load_index(root, version, use_cache=False)
    # a missing table
    (root / version / "ego_pose.json").unlink()
    with pytest.raises(BevctlError, match=r"missing nuScenes table: .*ego_pose\.json"):
        load_index(root, version)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bevctl.cli", "synth", str(tmp_path / "x"), "--image-size", "big"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--image-size" in lines[0]
    assert "Traceback" not in proc.stderr

"""The one module that talks to nuscenes-devkit's tables: splits, samples, rigs, poses.

``load_index(dataroot, version)`` returns a :class:`~bevctl.data.records.DatasetIndex`: every
keyframe sample, per split in scene order, with its six cameras (fixed order
:data:`~bevctl.data.records.CAMERAS`), each camera with its image path, ``pix_T_cam``,
``ego_T_cam`` and the ``global_T_ego`` of **that camera's own sample_data** (the six cameras
fire at different times), the sample's own ego pose (LIDAR_TOP's, as in nuScenes; CAM_FRONT's
when a dataset has no lidar) and the previous keyframe of the same scene.

Building the index for v1.0-trainval loads ~1.2 GB of JSON through the devkit and takes
tens of seconds, so the result is cached as JSON under ``$BEVCTL_CACHE_DIR`` (default
``~/.cache/bevctl``), keyed by the dataroot, the version, and the size and mtime of every
table file; a log line says whether the cache was used.

Splits: the official ones of ``nuscenes.utils.splits`` for v1.0-trainval (train, val),
v1.0-mini (train, val = mini_train, mini_val) and v1.0-test (test). Any other version uses the
split the dataset records in ``<dataroot>/<version>/bevctl_splits.json``
(``{"train": [scene names], "val": [...]}``, written by ``bevctl synth``); a dataset without
one gets a deterministic scene-level split from a hash of each scene name (80% train).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pyquaternion import Quaternion

from bevctl import __version__
from bevctl.data.records import CAMERAS, CameraRecord, DatasetIndex, SampleRecord
from bevctl.errors import BevctlError
from bevctl.io import atomic_write_text

log = logging.getLogger(__name__)

TABLES: tuple[str, ...] = (
    "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor",
    "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map",
)  # fmt: skip

# Fields bevctl reads (directly or through the devkit's reverse index), per table.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "sensor": ("token", "channel", "modality"),
    "calibrated_sensor": ("token", "sensor_token", "translation", "rotation", "camera_intrinsic"),
    "ego_pose": ("token", "translation", "rotation", "timestamp"),
    "log": ("token", "location"),
    "scene": ("token", "name", "log_token", "first_sample_token", "nbr_samples"),
    "sample": ("token", "timestamp", "scene_token", "prev", "next"),
    "sample_data": (
        "token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "filename",
        "timestamp", "is_key_frame", "width", "height",
    ),
    "sample_annotation": ("token", "sample_token", "instance_token"),
    "instance": ("token", "category_token"),
    "category": ("token", "name"),
    "map": ("token", "log_tokens", "filename"),
}  # fmt: skip

SPLITS_FILE = "bevctl_splits.json"
_CACHE_SCHEMA = 1


def cache_dir() -> Path:
    return Path(os.environ.get("BEVCTL_CACHE_DIR", Path.home() / ".cache" / "bevctl"))


# --------------------------------------------------------------------------------------------
# Input checks: one clear line per problem
# --------------------------------------------------------------------------------------------


def check_dataroot(dataroot: str | Path, version: str) -> Path:
    """Refuse a missing dataroot, version folder or table with one clear error line."""
    root = Path(dataroot)
    if not root.is_dir():
        raise BevctlError(f"dataroot not found: {root}")
    table_root = root / version
    if not table_root.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("v"))
        hint = f" (found: {', '.join(found)})" if found else ""
        raise BevctlError(f"version folder not found: {table_root}{hint}")
    for table in TABLES:
        if not (table_root / f"{table}.json").is_file():
            raise BevctlError(f"missing nuScenes table: {table_root / f'{table}.json'}")
    return root


def _check_fields(table_root: Path) -> None:
    """Every record of every table bevctl reads has the fields it needs."""
    for table, fields in REQUIRED_FIELDS.items():
        path = table_root / f"{table}.json"
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BevctlError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(records, list):
            raise BevctlError(f"{path}: expected a list of records")
        required = set(fields)
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise BevctlError(f"{path}: record {i} is not an object")
            missing = required - rec.keys()
            if missing:
                raise BevctlError(
                    f"{path}: record {i} (token {rec.get('token', '?')}) misses field(s) {sorted(missing)}"
                )


def _table_fingerprint(dataroot: Path, version: str) -> dict[str, Any]:
    table_root = dataroot / version
    files = [table_root / f"{t}.json" for t in TABLES] + [table_root / SPLITS_FILE]
    stamp = {}
    for f in files:
        if f.exists():
            st = f.stat()
            stamp[f.name] = [st.st_size, st.st_mtime_ns]
    return {
        "schema": _CACHE_SCHEMA,
        "dataroot": str(dataroot.resolve()),
        "version": version,
        "tables": stamp,
    }


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _hash_split(scene_names: list[str], train_fraction: float = 0.8) -> dict[str, list[str]]:
    def u(name: str) -> float:
        return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    train = [s for s in scene_names if u(s) < train_fraction]
    val = [s for s in scene_names if u(s) >= train_fraction]
    return {"train": train, "val": val}


def scene_splits(dataroot: Path, version: str, scene_names: list[str]) -> dict[str, list[str]]:
    """Split name -> scene names present in the dataset (sorted)."""
    from nuscenes.utils.splits import create_splits_scenes  # noqa: PLC0415 - nuscenes-devkit: heavy (matplotlib, descartes); only when the devkit is used

    present = set(scene_names)
    official = {
        "v1.0-trainval": {"train": "train", "val": "val"},
        "v1.0-mini": {"train": "mini_train", "val": "mini_val"},
        "v1.0-test": {"test": "test"},
    }
    if version in official:
        all_splits = create_splits_scenes()
        splits = {ours: all_splits[theirs] for ours, theirs in official[version].items()}
    else:
        path = dataroot / version / SPLITS_FILE
        if path.exists():
            try:
                splits = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise BevctlError(f"{path}: not valid JSON ({e.msg})") from None
            if not isinstance(splits, dict) or not all(
                isinstance(v, list) and all(isinstance(s, str) for s in v) for v in splits.values()
            ):
                raise BevctlError(f"{path}: expected {{split name: [scene names]}}")
            unknown = sorted({s for v in splits.values() for s in v} - present)
            if unknown:
                raise BevctlError(f"{path}: scene '{unknown[0]}' is not in the scene table")
        else:
            log.info("no %s in %s: using a deterministic hash split of the scenes", SPLITS_FILE, version)
            splits = _hash_split(sorted(present))
    return {name: sorted(s for s in scenes if s in present) for name, scenes in splits.items()}


# --------------------------------------------------------------------------------------------
# Building the index
# --------------------------------------------------------------------------------------------


def _pose_matrix(rec: dict[str, Any]) -> np.ndarray:
    """A nuScenes ``rotation`` [w, x, y, z] + ``translation`` record -> (4, 4) float64."""
    out = np.eye(4)
    out[:3, :3] = Quaternion(rec["rotation"]).rotation_matrix
    out[:3, 3] = np.asarray(rec["translation"], dtype=np.float64)
    return out


def _build_index(dataroot: Path, version: str, check_images: bool) -> DatasetIndex:
    from nuscenes.nuscenes import NuScenes  # noqa: PLC0415 - nuscenes-devkit: heavy (matplotlib, descartes); only when the devkit is used

    table_root = dataroot / version
    _check_fields(table_root)
    try:
        nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    except KeyError as e:
        raise BevctlError(f"{table_root}: a record refers to a missing token {e}") from None
    except AssertionError as e:
        raise BevctlError(f"{table_root}: nuscenes-devkit refused the dataset: {e}") from None

    def get(table: str, token: str) -> dict[str, Any]:
        try:
            return nusc.get(table, token)
        except KeyError:
            raise BevctlError(f"{table_root}: {table} token {token} is referenced but missing") from None

    samples: dict[str, SampleRecord] = {}
    scenes: dict[str, list[str]] = {}
    missing_images: list[str] = []
    for scene in sorted(nusc.scene, key=lambda s: s["name"]):
        location = get("log", scene["log_token"])["location"]
        tokens: list[str] = []
        token = scene["first_sample_token"]
        prev_token: str | None = None
        while token:
            sample = get("sample", token)
            cams = []
            for channel in CAMERAS:
                if channel not in sample["data"]:
                    raise BevctlError(f"{table_root}: sample {token} has no {channel} sample_data")
                sd = get("sample_data", sample["data"][channel])
                calib = get("calibrated_sensor", sd["calibrated_sensor_token"])
                intrinsic = np.asarray(calib["camera_intrinsic"], dtype=np.float64)
                if intrinsic.shape != (3, 3):
                    raise BevctlError(
                        f"{table_root}: calibrated_sensor {calib['token']} ({channel}) has no 3x3 camera_intrinsic"
                    )
                image_path = dataroot / sd["filename"]
                if check_images and not image_path.is_file():
                    missing_images.append(str(image_path))
                cams.append(
                    CameraRecord(
                        channel=channel,
                        sample_data_token=sd["token"],
                        image_path=str(image_path),
                        filename=sd["filename"],
                        width=int(sd["width"]),
                        height=int(sd["height"]),
                        timestamp=int(sd["timestamp"]),
                        pix_T_cam=intrinsic,
                        ego_T_cam=_pose_matrix(calib),
                        global_T_ego=_pose_matrix(get("ego_pose", sd["ego_pose_token"])),
                    )
                )
            ref_channel = "LIDAR_TOP" if "LIDAR_TOP" in sample["data"] else "CAM_FRONT"
            ref_sd = get("sample_data", sample["data"][ref_channel])
            samples[token] = SampleRecord(
                token=token,
                scene_token=scene["token"],
                scene_name=scene["name"],
                index_in_scene=len(tokens),
                timestamp=int(sample["timestamp"]),
                location=location,
                global_T_ego=_pose_matrix(get("ego_pose", ref_sd["ego_pose_token"])),
                cameras=tuple(cams),
                prev_token=prev_token,
            )
            tokens.append(token)
            prev_token = token
            token = sample["next"]
        scenes[scene["name"]] = tokens
    if missing_images:
        raise BevctlError(
            f"image not found: {missing_images[0]} ({len(missing_images)} camera image(s) missing in {dataroot})"
        )
    return DatasetIndex(
        dataroot=str(dataroot.resolve()),
        version=version,
        split_scenes=scene_splits(dataroot, version, list(scenes)),
        scenes=scenes,
        samples=samples,
    )


# --------------------------------------------------------------------------------------------
# Cache (JSON, no pickle)
# --------------------------------------------------------------------------------------------


def _index_to_json(index: DatasetIndex) -> dict[str, Any]:
    def cam(c: CameraRecord) -> dict[str, Any]:
        return {
            "channel": c.channel, "sample_data_token": c.sample_data_token, "filename": c.filename,
            "width": c.width, "height": c.height, "timestamp": c.timestamp,
            "pix_T_cam": c.pix_T_cam.tolist(), "ego_T_cam": c.ego_T_cam.tolist(),
            "global_T_ego": c.global_T_ego.tolist(),
        }  # fmt: skip

    return {
        "split_scenes": index.split_scenes,
        "scenes": index.scenes,
        "samples": [
            {
                "token": s.token, "scene_token": s.scene_token, "scene_name": s.scene_name,
                "index_in_scene": s.index_in_scene, "timestamp": s.timestamp, "location": s.location,
                "global_T_ego": s.global_T_ego.tolist(), "prev_token": s.prev_token,
                "cameras": [cam(c) for c in s.cameras],
            }  # fmt: skip
            for s in index.samples.values()
        ],
    }


def _index_from_json(data: dict[str, Any], dataroot: Path, version: str) -> DatasetIndex:
    root = dataroot.resolve()
    samples = {}
    for s in data["samples"]:
        cams = tuple(
            CameraRecord(
                channel=c["channel"], sample_data_token=c["sample_data_token"],
                image_path=str(root / c["filename"]), filename=c["filename"],
                width=c["width"], height=c["height"], timestamp=c["timestamp"],
                pix_T_cam=np.asarray(c["pix_T_cam"]), ego_T_cam=np.asarray(c["ego_T_cam"]),
                global_T_ego=np.asarray(c["global_T_ego"]),
            )  # fmt: skip
            for c in s["cameras"]
        )
        samples[s["token"]] = SampleRecord(
            token=s["token"], scene_token=s["scene_token"], scene_name=s["scene_name"],
            index_in_scene=s["index_in_scene"], timestamp=s["timestamp"], location=s["location"],
            global_T_ego=np.asarray(s["global_T_ego"]), cameras=cams, prev_token=s["prev_token"],
        )  # fmt: skip
    return DatasetIndex(
        dataroot=str(root),
        version=version,
        split_scenes=data["split_scenes"],
        scenes=data["scenes"],
        samples=samples,
    )


def load_index(
    dataroot: str | Path, version: str, *, use_cache: bool = True, check_images: bool = True
) -> DatasetIndex:
    """The dataset's keyframe index (cached). Raises :class:`BevctlError` on bad input."""
    root = check_dataroot(dataroot, version)
    key = _table_fingerprint(root, version)
    key_hash = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache_file = cache_dir() / "index" / f"{version}-{key_hash}.json"
    if use_cache and cache_file.is_file():
        try:
            data = json.loads(cache_file.read_text())
            if data.get("key") == key:
                index = _index_from_json(data["index"], root, version)
                log.info("index: %d samples from cache %s", len(index.samples), cache_file)
                return index
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("index cache %s is unreadable: rebuilding it", cache_file)
    start = time.perf_counter()
    index = _build_index(root, version, check_images)
    elapsed = time.perf_counter() - start
    if use_cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            payload = {"key": key, "bevctl_version": __version__, "index": _index_to_json(index)}
            atomic_write_text(cache_file, json.dumps(payload))
            where = f", cached at {cache_file}"
        except OSError as e:  # a read-only home must not stop the job
            where = f" (not cached: {e.strerror})"
    else:
        where = ""
    log.info("index: built %d samples of %s in %.1f s%s", len(index.samples), version, elapsed, where)
    return index


def parse_splits(text: str, index: DatasetIndex) -> list[str]:
    """``"train,val"`` -> ``["train", "val"]``, each checked against the index."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise BevctlError("--splits: no split given")
    for name in names:
        if name not in index.split_scenes:
            raise BevctlError(
                f"--splits: no split '{name}' in {index.version} (have: {', '.join(index.split_scenes)})"
            )
    return names

"""The real nuScenes six-camera rig shipped with bevctl, and intrinsics for resized images.

``bevctl/assets/nuscenes_rig.json`` holds one real sample's calibration (public nuScenes
metadata): per camera the camera->ego quaternion ``[w, x, y, z]`` of the optical frame, the
position in the ego frame and the 3x3 intrinsics of the 1600x900 image. The synthetic world,
model tests and benchmarks build on it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from pyquaternion import Quaternion

from bevctl.data.records import CAMERAS

RIG_PATH = Path(__file__).resolve().parents[1] / "assets" / "nuscenes_rig.json"


@cache
def load_rig_json() -> dict[str, Any]:
    return json.loads(RIG_PATH.read_text())


def scale_intrinsics(pix_T_cam: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Intrinsics ``(..., 3, 3)`` of an image of size ``from_hw`` -> of the resized ``to_hw``
    image (pixel centres at integer coordinates: ``u' = (u + 0.5) * sx - 0.5``)."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    s = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], dtype=np.float64)
    return s @ np.asarray(pix_T_cam, dtype=np.float64)


def reference_rig(image_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``pix_T_cam (6, 3, 3)`` (scaled to ``image_hw``, default 900x1600) and
    ``ego_T_cam (6, 4, 4)`` of the shipped rig, float64, in :data:`CAMERAS` order."""
    data = load_rig_json()
    native = (data["image_size"]["height"], data["image_size"]["width"])
    ks, ts = [], []
    for name in CAMERAS:
        cam = data["cameras"][name]
        ks.append(scale_intrinsics(np.array(cam["camera_intrinsic"]), native, image_hw or native))
        ego_T_cam = np.eye(4)
        ego_T_cam[:3, :3] = Quaternion(cam["rotation"]).rotation_matrix
        ego_T_cam[:3, 3] = cam["translation"]
        ts.append(ego_T_cam)
    return np.stack(ks), np.stack(ts)

"""Plain records of the data layer: what every other module sees of a nuScenes dataset.

They hold numpy matrices and absolute paths only, so they pickle cheaply to Ray actors and
DataLoader workers and never drag nuscenes-devkit along. :mod:`bevctl.data.nuscenes` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bevctl.errors import BevctlError

# One fixed camera order everywhere (stores, models, losses).
CAMERAS: tuple[str, ...] = (
    "CAM_FRONT_LEFT",
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_LEFT",
    "CAM_BACK",
    "CAM_BACK_RIGHT",
)


@dataclass(frozen=True)
class CameraRecord:
    channel: str  # e.g. "CAM_FRONT"
    sample_data_token: str
    image_path: str  # absolute path of the JPEG
    filename: str  # path relative to the dataroot, as in the sample_data table
    width: int
    height: int
    timestamp: int  # microseconds
    pix_T_cam: np.ndarray  # (3, 3) float64 intrinsics
    ego_T_cam: np.ndarray  # (4, 4) float64 camera (optical frame) -> ego
    global_T_ego: np.ndarray  # (4, 4) float64 ego pose at *this camera's* timestamp


@dataclass(frozen=True)
class SampleRecord:
    token: str
    scene_token: str
    scene_name: str
    index_in_scene: int  # 0-based position of this keyframe in its scene
    timestamp: int  # microseconds
    location: str  # map name, e.g. "singapore-onenorth"
    global_T_ego: np.ndarray  # (4, 4) the sample's own ego pose (LIDAR_TOP, else CAM_FRONT)
    cameras: tuple[CameraRecord, ...]  # in CAMERAS order
    prev_token: str | None  # previous keyframe in the same scene, None for the first


@dataclass
class DatasetIndex:
    """Every keyframe sample of a dataset, with the scene-level split."""

    dataroot: str
    version: str
    split_scenes: dict[str, list[str]]  # split name -> scene names
    scenes: dict[str, list[str]]  # scene name -> sample tokens in time order (scene order)
    samples: dict[str, SampleRecord] = field(repr=False)

    def split_names(self) -> list[str]:
        return list(self.split_scenes)

    def samples_in(self, split: str) -> list[SampleRecord]:
        """The split's keyframes, scene by scene (scenes in split order), each in time order."""
        if split not in self.split_scenes:
            raise BevctlError(
                f"{self.dataroot}/{self.version}: no split '{split}' (have: {', '.join(self.split_scenes)})"
            )
        return [
            self.samples[t]
            for scene in self.split_scenes[split]
            for t in self.scenes.get(scene, [])
        ]

    def all_samples(self) -> list[SampleRecord]:
        return [self.samples[t] for tokens in self.scenes.values() for t in tokens]

    def find_sample(self, ref: str) -> SampleRecord:
        """A sample by its token or by ``SCENE:INDEX`` (0-based keyframe index in the scene,
        e.g. ``scene-0002:3``); one error line naming what is missing."""
        if ref in self.samples:
            return self.samples[ref]
        scene, sep, idx = ref.rpartition(":")
        if not sep:
            raise BevctlError(f"{self.dataroot}/{self.version}: no sample '{ref}' (give a sample token or "
                              "SCENE:INDEX; `bevctl samples` lists them)")
        if scene not in self.scenes:
            raise BevctlError(f"{self.dataroot}/{self.version}: no scene '{scene}' (`bevctl samples` lists them)")
        tokens = self.scenes[scene]
        if not idx.isdigit() or int(idx) >= len(tokens):
            raise BevctlError(f"{self.dataroot}/{self.version}: scene '{scene}' has keyframes 0..{len(tokens) - 1}, "
                              f"got index '{idx}'")
        return self.samples[tokens[int(idx)]]

    def scene_samples(self, scene: str) -> list[SampleRecord]:
        """The keyframes of ``scene`` in time order; one error line for an unknown scene."""
        if scene not in self.scenes:
            raise BevctlError(f"{self.dataroot}/{self.version}: no scene '{scene}' (`bevctl samples` lists them)")
        return [self.samples[t] for t in self.scenes[scene]]

    def listing(self, split: str | None = None) -> str:
        """Every split (or ``split``), its scenes and their sample tokens as ``SCENE:INDEX  TOKEN``
        lines: what ``bevctl samples`` prints."""
        splits = [split] if split else self.split_names()
        lines = []
        for name in splits:
            samples = self.samples_in(name)  # one error line for an unknown split
            lines.append(f"split {name}: {len(self.split_scenes[name])} scenes, {len(samples)} samples")
            for scene in self.split_scenes[name]:
                tokens = self.scenes.get(scene, [])
                lines.append(f"  {scene} ({len(tokens)} samples)")
                lines += [f"    {scene}:{i}  {t}" for i, t in enumerate(tokens)]
        return "\n".join(lines)

"""An in-memory dataset with the real sample interface, and ``RunSpec`` hooks that train the
toy stand-in model (:mod:`bevctl.train.model.toy`) on it: trainer tests, benchmarks and DDP
checks use them so they depend neither on data on disk nor on the full model's cost.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bevctl.config import BEVGrid
from bevctl.train.build import resolve
from bevctl.train.model.toy import ToyBEVModel


class ToyDataset(Dataset):
    """Random images with a fixed rig and smooth random labels; ``nan_at`` poisons one sample."""

    def __init__(self, n: int, grid: BEVGrid, num_classes: int, image_hw=(32, 64), label_hw=(16, 32),
                 seed: int = 0, nan_at: int | None = None, rig: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.n, self.grid, self.c = n, grid, num_classes
        self.image_hw, self.label_hw, self.seed, self.nan_at = tuple(image_hw), tuple(label_hw), seed, nan_at
        if rig is None:
            rig = default_rig(self.image_hw)
        self.pix_T_cam, self.ego_T_cam = rig

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng(self.seed * 100003 + i)
        h, w = self.image_hw
        images = torch.from_numpy(rng.integers(0, 256, (6, 3, h, w), dtype=np.uint8))
        coarse = rng.integers(0, self.c, (6, 1, 4, 8)).astype(np.float32)
        labels = F.interpolate(torch.from_numpy(coarse), size=self.label_hw, mode="nearest")[:, 0].to(torch.uint8)
        bev = F.interpolate(torch.from_numpy(rng.integers(0, self.c, (1, 1, 8, 4)).astype(np.float32)),
                            size=self.grid.shape, mode="nearest")[0, 0].to(torch.uint8)
        pose = np.eye(4)
        pose[0, 3] = 2.0 * i
        prev = np.eye(4)
        prev[0, 3] = 2.0 * (i - 1)
        item = {
            "token": f"toy{i:05d}",
            "images": images,
            "pix_T_cam": torch.from_numpy(self.pix_T_cam).float(),
            "ego_T_cam": torch.from_numpy(self.ego_T_cam).float(),
            "global_T_ego": torch.from_numpy(pose),
            "labels": labels,
            "bev_gt": bev,
            "has_prev": i > 0,
            "prev_images": torch.from_numpy(rng.integers(0, 256, (6, 3, h, w), dtype=np.uint8)),
            "prev_pix_T_cam": torch.from_numpy(self.pix_T_cam).float(),
            "prev_ego_T_cam": torch.from_numpy(self.ego_T_cam).float(),
            "prev_global_T_ego": torch.from_numpy(prev),
        }
        if self.nan_at is not None and i == self.nan_at:
            item["images"] = torch.full((6, 3, h, w), float("nan"))
            item["prev_images"] = item["images"].clone()
        return item


def default_rig(image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Six cameras at 1.5 m, 60 degrees apart, 70 degree horizontal FOV, for ``image_hw``."""
    h, w = image_hw
    f = (w / 2) / np.tan(np.radians(35))
    pix = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]])
    # optical frame (x right, y down, z forward) -> ego (x fwd, y left, z up) for yaw 0
    base = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=np.float64)
    pitch = np.radians(-8)  # looking slightly down
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    egos = []
    for yaw_deg in (60, 0, -60, 120, 180, -120):  # CAMERAS order
        yaw = np.radians(yaw_deg)
        rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
        t = np.eye(4)
        t[:3, :3] = rz @ base @ rx
        t[:3, 3] = [np.cos(yaw) * 1.0, np.sin(yaw) * 1.0, 1.5]
        egos.append(t)
    return np.stack([pix] * 6), np.stack(egos)


def toy_dataset_factory(spec) -> ToyDataset:
    """``RunSpec.dataset_factory`` for tests/benchmarks: ``spec.extra`` may set n, nan_at, label_hw."""
    setup = resolve(spec.cfg)
    return ToyDataset(spec.extra.get("n", 16), setup.grid, setup.num_classes, image_hw=setup.image_hw,
                      label_hw=tuple(spec.extra.get("label_hw", (16, 28))), seed=spec.extra.get("data_seed", 0),
                      nan_at=spec.extra.get("nan_at"))


def toy_model_with_dropout(spec) -> ToyBEVModel:
    """``RunSpec.model_factory``: the toy model with dropout 0.2 (RNG-dependent training)."""
    setup = resolve(spec.cfg)
    return ToyBEVModel(setup.grid, setup.num_classes, setup.image_hw, dropout=0.2)

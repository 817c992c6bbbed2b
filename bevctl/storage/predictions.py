"""The prediction store ``preds.zarr`` written by ``bevctl predict``, and its reader.

Layout (a :class:`~bevctl.storage.base.SampleStore` of kind ``bev_predictions``; every array is
plain Zarr v3 with zarr's own ``zstd`` codec and its checksum, readable by any Zarr reader)::

    preds.zarr/
      tokens         str     (N,)           sample tokens, scene by scene, each in time order
      done           uint8   (N,)           0 todo, 1 done, 2 failed (the driver only)
      pred           uint8   (N, X, Y)      argmax class id per BEV cell (0 background, k+1 class k);
                                            fill 255 = "no prediction" (never a class)
      probabilities  uint8   (N, C, X, Y)   optional (--probabilities): softmax * 255, rounded;
                                            fill 255 = "no prediction"
      scene          str     (N,)           scene name of every sample   } written when the
      index_in_scene int32   (N,)           keyframe index in the scene  } store is made (known
      global_T_ego   float64 (N, 4, 4)      the sample's ego pose        } before any forward)
      history        uint8   (N,)           1: the model saw the previous frame's BEV (temporal)
      attrs.bevctl.metadata = {grid, class_set, classes, checkpoint {sha256, model, mode},
                               dataset {version}, probabilities, temporal}  -- validated on resume
      attrs.bevctl.provenance = {dataroot, checkpoint path}                 -- recorded only

BEV layout: ``pred[i, a, b]`` is the cell whose centre is at ego ``x = x_min + (a + 0.5) * res``
(forward), ``y = y_min + (b + 0.5) * res`` (left), grid from the metadata.

Reading (the documented API, docs/predict.md)::

    store = PredictionStore.open("preds.zarr")
    for scene in store.scenes:
        for p in store.iter_scene(scene):      # SamplePrediction, in time order
            p.ids                              # (X, Y) uint8 class ids, ego frame
            p.ego_xy()                         # (X, Y, 2) cell centres in the ego frame (m)
            p.global_xy()                      # (X, Y, 2) the same cells in the global frame (m)
    store.get(token)                           # one sample
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bevctl.config import BEVClassSet, BEVGrid, dataclass_from_dict, dataclass_to_dict
from bevctl.data.records import SampleRecord
from bevctl.errors import BevctlError
from bevctl.geometry import bev_cell_centers
from bevctl.storage.base import DONE, FAILED, ArraySpec, SampleStore
from bevctl.storage.codecs import IGNORE, mask_compressors

KIND = "bev_predictions"
NO_PREDICTION = IGNORE  # 255: never a class
PREDICTION_ZSTD_LEVEL = 3


def prediction_arrays(samples: Sequence[SampleRecord], grid: BEVGrid, num_classes: int, probabilities: bool,
                      history: Sequence[bool]) -> list[ArraySpec]:
    """The data arrays of a store for ``samples`` (per-sample metadata filled in)."""
    n = len(samples)
    # zarr's own zstd with its checksum (any Zarr reader, corruption detected), at level 3: maps
    # are written while the model runs, and level 15 cost more CPU than it saved bytes
    # (bench/results/predict.md)
    zstd = mask_compressors(PREDICTION_ZSTD_LEVEL)
    arrays = [
        ArraySpec("pred", (n, *grid.shape), "uint8", (1, *grid.shape), fill_value=NO_PREDICTION,
                  compressors=zstd, dimension_names=("sample", "x", "y")),
        ArraySpec("scene", (n,), "str", (max(1, n),), fill_value="",
                  compressors=zstd, data=np.array([s.scene_name for s in samples], dtype=object)),
        ArraySpec("index_in_scene", (n,), "int32", (max(1, n),), fill_value=-1, compressors=zstd,
                  data=np.array([s.index_in_scene for s in samples], dtype=np.int32)),
        ArraySpec("global_T_ego", (n, 4, 4), "float64", (max(1, n), 4, 4), fill_value=float("nan"),
                  compressors=zstd, data=np.stack([s.global_T_ego for s in samples]) if n else None),
        ArraySpec("history", (n,), "uint8", (max(1, n),), fill_value=0, compressors=zstd,
                  data=np.array(history, dtype=np.uint8)),
    ]
    if probabilities:
        arrays.append(ArraySpec("probabilities", (n, num_classes, *grid.shape), "uint8", (1, num_classes, *grid.shape),
                                fill_value=NO_PREDICTION, compressors=zstd, dimension_names=("sample", "class", "x", "y")))
    return arrays


def quantize_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] -> uint8 ``round(p * 255)`` (a step of 1/255)."""
    return (probs.clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class SamplePrediction:
    """One sample of a prediction store."""

    token: str
    scene: str
    index_in_scene: int
    ids: np.ndarray  # (X, Y) uint8 class ids in the sample's ego frame
    global_T_ego: np.ndarray  # (4, 4) float64
    history: bool  # the model saw the previous frame's BEV
    grid: BEVGrid
    probabilities: np.ndarray | None = None  # (C, X, Y) float32 in [0, 1], None unless stored

    def ego_xy(self) -> np.ndarray:
        """``(X, Y, 2)`` float64: every cell centre's ego (x forward, y left) in metres."""
        return bev_cell_centers(self.grid, dtype=torch.float64).numpy()

    def global_xy(self) -> np.ndarray:
        """``(X, Y, 2)`` float64: every cell centre in the global (map) frame, in metres."""
        xy = self.ego_xy()
        rot, trans = self.global_T_ego[:2, :2], self.global_T_ego[:2, 3]  # the ground plane: z = 0
        return xy @ rot.T + trans


class PredictionStore:
    """Reader (and, for :func:`bevctl.train.predict.predict`, writer) of a ``preds.zarr``."""

    def __init__(self, store: SampleStore) -> None:
        self.store = store
        self.path = store.path
        meta = store.metadata
        try:
            self.grid: BEVGrid = dataclass_from_dict(BEVGrid, meta["grid"], f"{self.path}: grid")
            self.class_set: BEVClassSet = dataclass_from_dict(BEVClassSet, meta["class_set"], f"{self.path}: class_set")
        except KeyError as e:
            raise BevctlError(f"{self.path}: prediction store metadata lacks {e}") from None
        self.class_names: tuple[str, ...] = tuple(meta.get("classes", self.class_set.names_with_background))
        self.has_probabilities: bool = bool(meta.get("probabilities"))
        self.tokens: list[str] = store.tokens
        self._scene = [str(s) for s in store.array("scene")[:]] if self.tokens else []
        self._index = np.asarray(store.array("index_in_scene")[:]) if self.tokens else np.zeros(0, np.int32)
        self._poses = np.asarray(store.array("global_T_ego")[:]) if self.tokens else np.zeros((0, 4, 4))
        self._history = np.asarray(store.array("history")[:]) if self.tokens else np.zeros(0, np.uint8)
        self._status = store.status()

    @classmethod
    def open(cls, path: str | Path, expected_grid: BEVGrid | None = None,
             expected_classes: BEVClassSet | None = None) -> "PredictionStore":
        """Open ``preds.zarr`` (a local path or a URL) read-only; with ``expected_*``, refuse a
        store of another grid or class set (one error line)."""
        expected: dict[str, Any] = {}
        if expected_grid is not None:
            expected["grid"] = dataclass_to_dict(expected_grid)
        if expected_classes is not None:
            expected["class_set"] = dataclass_to_dict(expected_classes)
        return cls(SampleStore.open(path, KIND, expected=expected or None, mode="r"))

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self.store

    @property
    def scenes(self) -> list[str]:
        """Scene names in store order."""
        return list(dict.fromkeys(self._scene))

    @property
    def done_tokens(self) -> list[str]:
        return [t for t, s in zip(self.tokens, self._status) if s == DONE]

    def get(self, token: str) -> SamplePrediction:
        """The prediction of ``token``; refuses a sample not predicted yet."""
        i = self.store.index_of(token)
        if self._status[i] != DONE:
            raise BevctlError(f"{self.path}: sample '{token}' has no prediction yet "
                              f"({'failed' if self._status[i] == FAILED else 'todo'}); rerun bevctl predict")
        probs = None
        if self.has_probabilities:
            probs = np.asarray(self.store.array("probabilities")[i], dtype=np.float32) / 255.0
        return SamplePrediction(token=token, scene=self._scene[i], index_in_scene=int(self._index[i]),
                                ids=np.asarray(self.store.array("pred")[i]), global_T_ego=self._poses[i],
                                history=bool(self._history[i]), grid=self.grid, probabilities=probs)

    def iter_scene(self, scene: str) -> Iterator[SamplePrediction]:
        """The predicted samples of ``scene`` in time order (samples not done are skipped)."""
        rows = [i for i, s in enumerate(self._scene) if s == scene]
        if not rows:
            raise BevctlError(f"{self.path}: no scene '{scene}' in this store (have: {', '.join(self.scenes)})")
        for i in sorted(rows, key=lambda r: int(self._index[r])):
            if self._status[i] == DONE:
                yield self.get(self.tokens[i])

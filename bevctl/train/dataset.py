"""Training samples streamed from the data-layer index and the Zarr stores.

Per sample (one ``__getitem__``, run in DataLoader worker processes with prefetch):

- the six camera images, decoded (JPEG draft mode when shrinking) and resized to the model's
  input ``image_hw``, as uint8 ``(6, 3, H, W)``; ``pix_T_cam`` scaled to match
  (:func:`scale_intrinsics`); ``ego_T_cam`` expressed in the *sample's* ego frame (each camera
  fires at its own timestamp, so its extrinsics are composed with the ego motion between the
  camera's ego pose and the sample's); and the sample's ``global_T_ego``;
- pretraining: the six pseudo-label masks from ``labels.zarr`` mapped to BEV ids through the
  label-map LUT (0 background, k+1 class k, 255 ignore), resampled (nearest, pixel centres) to
  the loss resolution ``label_hw``; optionally their confidence in [0, 1]. With
  ``label_adjacent = K > 0`` also the masks of the K keyframes before and after the sample in
  its scene, as more "cameras" of the loss (``labels (6 * (2K + 1), h, w)``, the sample's own
  six first) with their matrices in ``label_*`` fields; a neighbour past the scene's ends is
  all-ignore. They supervise the cells that no camera of the sample sees (under and around the
  ego: the ego moves ~4 m between keyframes);
- fine-tuning / evaluation: the BEV ground truth from the GT cache (or rasterised on the fly);
- temporal training: the previous keyframe of the same scene (images + matrices + pose) and
  ``has_prev`` (False for a scene's first frame, whose ``prev_*`` fields repeat the frame).

Samples whose pseudo-labels or GT the store marks failed (or not done) are skipped when the
dataset is built. Stores are opened lazily in each worker (nothing heavy is pickled).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from bevctl.config import BEVClassSet, BEVGrid
from bevctl.data.bev_gt import bev_gt_for_sample
from bevctl.data.images import read_image
from bevctl.data.nuscenes import load_index
from bevctl.data.rig import scale_intrinsics  # noqa: F401  (re-exported)
from bevctl.data.records import DatasetIndex, SampleRecord
from bevctl.errors import BevctlError
from bevctl.pseudolabel.label_maps import resolve_label_map_record
from bevctl.storage import location
from bevctl.storage.base import DONE
from bevctl.storage.gt_store import GTStore
from bevctl.storage.labels import LabelStore
from bevctl.train.build import resolve

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def load_image(path: str, image_hw: tuple[int, int]) -> np.ndarray:
    """Decode and resize one image (:func:`bevctl.data.images.read_image`) -> uint8 ``(3, H, W)``."""
    return np.ascontiguousarray(read_image(path, image_hw).transpose(2, 0, 1))


def resize_nearest(masks: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest resampling of ``(..., H, W)`` label maps by pixel centres."""
    h, w = masks.shape[-2:]
    if (h, w) == tuple(out_hw):
        return masks
    rows = np.minimum(((np.arange(out_hw[0]) + 0.5) * h / out_hw[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_hw[1]) + 0.5) * w / out_hw[1]).astype(np.int64), w - 1)
    return masks[..., rows[:, None], cols[None, :]]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples of :class:`TrainDataset` (or the toy dataset) -> one batch: tensors stacked
    along a new first dimension, tokens as a list (the DataLoader's ``collate_fn``)."""
    return default_collate(items)


def choose_scenes(scenes: list[str], fraction: float, seed: int) -> list[str]:
    """A deterministic, seeded, scene-level subset: ``max(1, round(fraction * n))`` scenes.

    The scenes are sorted, permuted with ``seed`` and the first ones taken, so for one seed a
    smaller fraction is a subset of a larger one. Returned in the input order.
    """
    if not 0 < fraction <= 1:
        raise BevctlError(f"--fraction must be in (0, 1], got {fraction}")
    if not scenes:
        return []
    ordered = sorted(set(scenes))
    k = max(1, int(round(fraction * len(ordered))))
    perm = np.random.default_rng(seed).permutation(len(ordered))
    chosen = {ordered[i] for i in perm[:k]}
    return [s for s in scenes if s in chosen]


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class TrainDataset(Dataset):
    def __init__(
        self,
        samples: list[SampleRecord],
        all_samples: dict[str, SampleRecord],
        image_hw: tuple[int, int],
        *,
        labels_path: str | None = None,
        lut: np.ndarray | None = None,
        label_hw: tuple[int, int] | None = None,
        with_confidence: bool = False,
        gt_path: str | None = None,
        rasterize: tuple[str, BEVGrid, BEVClassSet] | None = None,
        load_prev: bool = False,
        label_adjacent: int = 0,
        label_tokens: set[str] | None = None,
        label_map: dict[str, Any] | None = None,
    ) -> None:
        """``label_map``: provenance of ``lut`` (:func:`resolve_label_map_record`), for the run's record."""
        self.samples = samples
        self.all_samples = all_samples
        self.image_hw = tuple(image_hw)
        self.labels_path, self.lut, self.label_hw = labels_path, lut, label_hw
        self.with_confidence = with_confidence
        self.gt_path, self.rasterize = gt_path, rasterize
        self.load_prev = load_prev
        self.label_adjacent = label_adjacent
        self.label_tokens = label_tokens  # samples whose pseudo-labels are usable (None = all)
        self.label_map = label_map
        self._next_token = ({r.prev_token: r.token for r in all_samples.values() if r.prev_token}
                            if label_adjacent else {})
        self._labels = None
        self._gt = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_labels"] = state["_gt"] = None
        return state

    @property
    def tokens(self) -> list[str]:
        return [s.token for s in self.samples]

    def _label_store(self):
        if self._labels is None:
            self._labels = LabelStore.open(self.labels_path)
        return self._labels

    def _gt_store(self):
        if self._gt is None:
            self._gt = GTStore.open(self.gt_path)
        return self._gt

    def _matrices(self, s: SampleRecord, ref: SampleRecord) -> dict[str, torch.Tensor]:
        """The cameras of ``s`` placed in the ego frame of ``ref`` (usually ``s`` itself)."""
        pix, ego, calib, motion = [], [], [], []
        ego_T_global = np.linalg.inv(np.asarray(ref.global_T_ego, dtype=np.float64))
        for cam in s.cameras:
            pix.append(scale_intrinsics(cam.pix_T_cam, (cam.height, cam.width), self.image_hw))
            # cameras fire at their own timestamps, so compose the calibration with the ego
            # motion between the reference's pose and the camera's pose
            m = ego_T_global @ np.asarray(cam.global_T_ego)
            motion.append(m)
            calib.append(np.asarray(cam.ego_T_cam))
            ego.append(m @ np.asarray(cam.ego_T_cam))
        return {
            "pix_T_cam": torch.from_numpy(np.stack(pix)).float(),  # (N, 3, 3)
            "ego_T_cam": torch.from_numpy(np.stack(ego)).float(),  # (N, 4, 4) in ref's ego frame
            "calib_ego_T_cam": torch.from_numpy(np.stack(calib)).float(),  # (N, 4, 4) static calibration
            "sample_T_camego": torch.from_numpy(np.stack(motion)).float(),  # (N, 4, 4) camera's ego -> ref's
        }

    def _cameras(self, s: SampleRecord) -> dict[str, Any]:
        imgs = [load_image(cam.image_path, self.image_hw) for cam in s.cameras]
        return {
            "images": torch.from_numpy(np.stack(imgs)),  # (N, 3, H, W) uint8
            **self._matrices(s, s),
            "global_T_ego": torch.from_numpy(np.asarray(s.global_T_ego, dtype=np.float64)),  # (4, 4)
        }

    def _neighbour(self, s: SampleRecord, offset: int) -> SampleRecord | None:
        """The keyframe ``offset`` steps before (< 0) or after (> 0) ``s`` in its scene."""
        cur: SampleRecord | None = s
        for _ in range(abs(offset)):
            token = cur.prev_token if offset < 0 else self._next_token.get(cur.token)
            cur = self.all_samples.get(token) if token else None
            if cur is None:
                return None
        return cur

    def _pseudo_labels(self, s: SampleRecord, own: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Pseudo-labels (and confidence) of ``s``, plus its neighbours' with ``label_adjacent``;
        ``own``: the sample's camera matrices (:meth:`_matrices`)."""
        store = self._label_store()
        frames: list[SampleRecord | None] = [s]
        for k in range(1, self.label_adjacent + 1):
            frames += [self._neighbour(s, -k), self._neighbour(s, k)]
        frames = [f if f is None or self.label_tokens is None or f.token in self.label_tokens else None
                  for f in frames]
        labels: list[np.ndarray | None] = []
        confs: list[np.ndarray | None] = []
        hw = None
        for f in frames:
            if f is None:
                labels.append(None)
                confs.append(None)
                continue
            raw = store.get(f.token)  # (N, Hs, Ws) labeler ids
            hw = hw or (tuple(self.label_hw) if self.label_hw else raw.shape[-2:])
            labels.append(np.ascontiguousarray(resize_nearest(self.lut[raw], hw)))
            conf = store.get_confidence(f.token) if self.with_confidence else None
            confs.append(None if conf is None else resize_nearest(conf, hw).astype(np.float32) / 255.0)
        # a neighbour past the scene's ends (or without labels): all-ignore, the sample's matrices
        labels = [np.full_like(labels[0], 255) if m is None else m for m in labels]
        out: dict[str, torch.Tensor] = {"labels": torch.from_numpy(np.concatenate(labels))}  # (N*F, h, w)
        if confs[0] is not None:
            confs = [np.zeros(labels[0].shape, np.float32) if c is None else c for c in confs]
            out["confidence"] = torch.from_numpy(np.concatenate(confs))
        if len(frames) > 1:
            mats = [own if f is None or f is s else self._matrices(f, s) for f in frames]
            for key in ("pix_T_cam", "calib_ego_T_cam", "sample_T_camego"):
                out[f"label_{key}"] = torch.cat([m[key] for m in mats])  # (N*F, ...)
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        item: dict[str, Any] = {"token": s.token, **self._cameras(s)}
        if self.labels_path is not None:
            item.update(self._pseudo_labels(s, item))
        if self.gt_path is not None:
            item["bev_gt"] = torch.from_numpy(self._gt_store().get(s.token))
        elif self.rasterize is not None:
            dataroot, grid, class_set = self.rasterize
            item["bev_gt"] = torch.from_numpy(bev_gt_for_sample(dataroot, s, grid, class_set))
        if self.load_prev:
            prev = self.all_samples.get(s.prev_token) if s.prev_token else None
            item["has_prev"] = prev is not None
            keys = ("images", "pix_T_cam", "ego_T_cam", "global_T_ego")
            cams = self._cameras(prev) if prev is not None else item
            item.update({f"prev_{k}": cams[k] for k in keys})
        return item


# --------------------------------------------------------------------------------------------
# Building it for a run
# --------------------------------------------------------------------------------------------


def select_samples(index: DatasetIndex, split: str, fraction: float, seed: int) -> tuple[list[str], list[SampleRecord]]:
    """(chosen scenes, their samples in scene/time order) of ``split``."""
    scenes = list(index.split_scenes.get(split, []))
    if split not in index.split_scenes:
        index.samples_in(split)  # raises the one-line error naming the splits
    chosen = choose_scenes(scenes, fraction, seed)
    keep = set(chosen)
    return chosen, [s for s in index.samples_in(split) if s.scene_name in keep]


def _filter_done(samples: list[SampleRecord], tokens: list[str], status: np.ndarray, done: int,
                 what: str) -> tuple[list[SampleRecord], dict[str, int]]:
    pos = {t: i for i, t in enumerate(tokens)}
    kept, missing, not_done = [], 0, 0
    for s in samples:
        i = pos.get(s.token)
        if i is None:
            missing += 1
        elif int(status[i]) != done:
            not_done += 1
        else:
            kept.append(s)
    if missing or not_done:
        log.warning("%s: skipping %d samples not in the store and %d failed/unfinished", what, missing, not_done)
    return kept, {"not_in_store": missing, "failed_or_todo": not_done}


def build_train_dataset(spec, write_scenes: bool = True, split: str | None = None) -> TrainDataset:
    """The dataset of a :class:`~bevctl.train.loop.RunSpec`; writes ``RUN/scenes.json``."""
    cfg = spec.cfg
    if not spec.dataroot or not spec.version:
        raise BevctlError("training needs --dataroot and --version")
    setup = resolve(cfg)
    grid, class_set = setup.grid, setup.class_set
    index = load_index(spec.dataroot, spec.version)
    split = split or cfg.train_split
    chosen, samples = select_samples(index, split, cfg.fraction, cfg.seed)
    skipped: dict[str, int] = {}
    kwargs: dict[str, Any] = {}
    if spec.mode == "pretrain":
        if not spec.labels:
            raise BevctlError("pretrain needs --labels labels.zarr")
        store = LabelStore.open(spec.labels)
        try:
            lut, kwargs["label_map"] = resolve_label_map_record(store.id2label, class_set, cfg.label_map)
        except BevctlError as e:
            raise BevctlError(f"{spec.labels} (labeler {store.model_id}): {e}") from None
        statuses = store.statuses()
        samples, skipped = _filter_done(samples, store.tokens, statuses, DONE, str(spec.labels))
        if cfg.label_adjacent:
            kwargs["label_tokens"] = {t for t, st in zip(store.tokens, statuses) if int(st) == DONE}
        kwargs.update(labels_path=str(spec.labels), lut=lut, label_hw=cfg.label_hw,
                      with_confidence=cfg.min_confidence > 0 and store.has_confidence,
                      load_prev=cfg.temporal_weight > 0, label_adjacent=cfg.label_adjacent)
    elif spec.mode == "finetune":
        if spec.gt:
            gt = GTStore.open(spec.gt, expected_grid=grid, expected_classes=class_set,
                              remedy=gt_store_remedy(spec.dataroot, spec.version, cfg.grid, cfg.class_set))
            samples, skipped = _filter_done(samples, gt.tokens, gt.status(), DONE, str(spec.gt))
            kwargs["gt_path"] = str(spec.gt)
        else:
            kwargs["rasterize"] = (str(spec.dataroot), grid, class_set)
    else:
        raise ValueError(spec.mode)
    if not samples:
        store = spec.labels if spec.mode == "pretrain" else spec.gt
        why = f"scenes chosen: {len(chosen)}"
        if store and skipped:
            why += (f"; {store}: {skipped['not_in_store']} not in the store"
                    + (" (a store of another dataset?)" if skipped["not_in_store"] and not skipped["failed_or_todo"]
                       else "") + f", {skipped['failed_or_todo']} failed or unfinished")
        raise BevctlError(f"no usable training samples in split '{split}' of {spec.dataroot}/{spec.version} ({why})")
    if write_scenes:
        location.makedirs(spec.run_dir)
        record = {"split": split, "fraction": cfg.fraction, "seed": cfg.seed, "scenes": chosen,
                  "num_scenes_in_split": len(index.split_scenes[split]), "num_samples": len(samples),
                  "skipped": skipped}
        path = location.join(spec.run_dir, "scenes.json")
        if spec.resume and location.is_file(path):
            old = json.loads(location.read_text(path))
            if old.get("scenes") != chosen:
                raise BevctlError(f"--resume: {path} lists other scenes than this command selects")
        location.write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return TrainDataset(samples, index.samples, setup.image_hw, **kwargs)


def gt_store_remedy(dataroot: str, version: str, grid: str, class_set: str) -> str:
    """What to do when a GT store was made for another grid or class set than a run's."""
    return (f"build one for this run's grid and classes with `bevctl prepare-gt --dataroot {dataroot} "
            f"--version {version} --grid {grid} --classes {class_set} --out NEW_GT.zarr` and pass it as --gt")


def eval_dataset(index: DatasetIndex, split: str, image_hw: tuple[int, int], grid: BEVGrid,
                 class_set: BEVClassSet, gt_path: str | None, remedy: str | None = None) -> TrainDataset:
    """Evaluation samples of ``split`` with their BEV GT (cache or on-the-fly rasterisation);
    ``remedy``: what to do if the GT store does not fit ``grid``/``class_set``."""
    samples = index.samples_in(split)
    kwargs: dict[str, Any] = {}
    if gt_path:
        gt = GTStore.open(gt_path, expected_grid=grid, expected_classes=class_set, remedy=remedy)
        samples, _ = _filter_done(samples, gt.tokens, gt.status(), DONE, gt_path)
        kwargs["gt_path"] = gt_path
    else:
        kwargs["rasterize"] = (index.dataroot, grid, class_set)
    if not samples:
        raise BevctlError(f"no samples with ground truth in split '{split}'")
    return TrainDataset(samples, index.samples, image_hw, **kwargs)

"""``bevctl visualize``: PNGs of one sample, or an animation of a whole scene.

One sample (``--sample TOKEN`` or ``SCENE:INDEX``), into a directory:

- ``bev.png``: prediction | ground truth, x (forward) up, y (left) to the left, metres on the
  axes, the ego drawn at the origin; under the prediction its error view (TP / FP / FN / wrong
  class) with per-class IoU; the class legend;
- ``cameras.png``: a row per camera (named), columns image | BEV prediction reprojected onto the
  ground | pseudo-labels (BEV ids after the run's label map); a run without pseudo-labels (a
  fine-tuned one) gets a column saying so; ``cam_<CAMERA>.png``: one row each;
- ``legend.json``: the class colours and what every file shows, for scripts.

A temporal model (pretrained with the temporal loss) sees the sample with its history: the
scene is run from its first keyframe up to the sample (:mod:`bevctl.train.inference`).
Every figure is drawn by :mod:`bevctl.render`. The scene animation is :mod:`bevctl.train.animate`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bevctl import render
from bevctl.config import BEVClassSet, BEVGrid
from bevctl.data.nuscenes import load_index
from bevctl.data.records import CAMERAS, DatasetIndex, SampleRecord
from bevctl.errors import BevctlError
from bevctl.pseudolabel.label_maps import resolve_label_map
from bevctl.storage import location
from bevctl.storage.labels import LabelStore
from bevctl.train.build import load_trained_model
from bevctl.train.config import TrainConfig
from bevctl.train.dataset import TrainDataset
from bevctl.train.distributed import resolve_device
from bevctl.train.inference import forward_in_order, make_loader, uses_history
from bevctl.train.losses import RayGrid, compute_ray_grid, reproject_logits


@dataclass
class DrawModel:
    """A trained model loaded for drawing."""

    name: str  # short label for titles: the run directory's name
    checkpoint: str
    model: torch.nn.Module
    cfg: TrainConfig
    run: dict[str, Any]  # the checkpoint's run record (mode, data paths)
    temporal: bool
    grid: BEVGrid
    class_set: BEVClassSet
    image_hw: tuple[int, int]  # model input (H, W)


def model_name(checkpoint: str) -> str:
    """``runs/pretrain/last.pt`` -> ``pretrain``; ``x/step_0000010.pt`` -> ``x step_0000010``."""
    p = Path(str(checkpoint).rstrip("/"))
    if p.suffix != ".pt":
        return p.name
    if p.parent.name == "checkpoints":
        return f"{p.parent.parent.name} {p.stem}"
    return p.parent.name if p.name == "last.pt" and p.parent.name else p.stem


def load_models(checkpoints: Sequence[str], device: torch.device) -> list[DrawModel]:
    """Load each checkpoint; all must share one grid and class set (to be drawn side by side)."""
    models = []
    for ckpt_path in checkpoints:
        t = load_trained_model(ckpt_path, device)
        models.append(DrawModel(model_name(str(ckpt_path)), str(ckpt_path), t.model, t.cfg, t.run,
                                uses_history(t.cfg, t.run), t.setup.grid, t.setup.class_set, t.setup.image_hw))
    for m in models[1:]:
        if (m.grid, m.class_set) != (models[0].grid, models[0].class_set):
            raise BevctlError(f"{m.checkpoint}: grid '{m.cfg.grid}' / classes '{m.cfg.class_set}' differ from "
                              f"{models[0].checkpoint}'s ('{models[0].cfg.grid}' / '{models[0].cfg.class_set}'); "
                              "models drawn side by side must share them")
    return models


def data_paths(m: DrawModel, dataroot: str | None, version: str | None, labels: str | None,
               gt: str | None) -> tuple[str, str, str | None, str | None]:
    """The given data paths, defaulting to the ones the run trained on."""
    if not dataroot and m.run.get("dataroot") and not Path(m.run["dataroot"]).is_dir():
        raise BevctlError(f"dataset {m.run['dataroot']} (recorded in {m.checkpoint}) not found: if it moved, "
                          "pass its new location as --dataroot")
    dataroot = dataroot or m.run.get("dataroot")
    version = version or m.run.get("version")
    if not dataroot or not version:
        raise BevctlError("visualize: the checkpoint names no dataset; pass --dataroot and --version")
    return str(dataroot), str(version), labels or m.run.get("labels"), gt or m.run.get("gt")


def drawing_dataset(m: DrawModel, index: DatasetIndex, samples: list[SampleRecord], labels: str | None,
                    gt: str | None) -> TrainDataset:
    """Images, BEV GT (cache, else rasterised) and, where the store has them, the pseudo-labels
    through ``m``'s label map."""
    kwargs: dict[str, Any] = {}
    if labels and location.exists(labels):
        store = LabelStore.open(labels)
        if all(s.token in store and store.status(s.token) == "done" for s in samples):
            kwargs.update(labels_path=str(labels), lut=resolve_label_map(store.id2label, m.class_set, m.cfg.label_map),
                          label_hw=m.cfg.label_hw)
    if gt and location.exists(gt):
        kwargs["gt_path"] = str(gt)
    else:
        kwargs["rasterize"] = (index.dataroot, m.grid, m.class_set)
    return TrainDataset(samples, index.samples, m.image_hw, **kwargs)


def predict_items(m: DrawModel, ds: TrainDataset, device: torch.device) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """``(item, prediction (X, Y) uint8)`` per sample of ``ds``, in order, with history."""
    loader = make_loader(ds, 1, 0, m.temporal)
    for fwd in forward_in_order(m.model, loader, ds.samples, device, m.temporal):
        item = {k: (v[0] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in fwd.batch.items()}
        yield item, fwd.logits.argmax(1)[0].cpu().numpy().astype(np.uint8)


def reprojection(pred: np.ndarray, item: dict[str, Any], grid: BEVGrid, num_classes: int) -> np.ndarray:
    """The BEV map ``(X, Y)`` seen from every camera: ``(6, H, W)`` class ids at the image
    resolution, 255 where the ray misses the ground or the grid."""
    image_hw = tuple(item["images"].shape[-2:])
    rays = compute_ray_grid(item["pix_T_cam"].cpu(), item["ego_T_cam"].cpu(), image_hw, image_hw, grid)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(pred).long(), num_classes).permute(2, 0, 1)[None].float()
    sampled = reproject_logits(onehot, grid, RayGrid(rays.xy[None], rays.valid[None]))[0].argmax(0)  # (N, P)
    return torch.where(rays.valid, sampled, torch.full_like(sampled, 255)).reshape(-1, *image_hw).numpy().astype(np.uint8)


def camera_images(item: dict[str, Any]) -> np.ndarray:
    """``(6, H, W, 3)`` uint8."""
    return item["images"].numpy().transpose(0, 2, 3, 1)


def pseudo_label_ids(item: dict[str, Any]) -> list[np.ndarray] | None:
    """The pseudo-labels (BEV ids, 255 ignore) of the six cameras at the image size, or None."""
    labels = item.get("labels")
    if labels is None:
        return None
    h, w = item["images"].shape[-2:]
    return [np.asarray(Image.fromarray(lab.numpy()).resize((w, h), Image.NEAREST)) for lab in labels[: len(CAMERAS)]]


def pseudo_label_images(item: dict[str, Any]) -> list[np.ndarray] | None:
    """:func:`pseudo_label_ids` in the class colours (ignore black), or None."""
    ids = pseudo_label_ids(item)
    return None if ids is None else [render.colorize(x) for x in ids]


NO_PSEUDO_LABELS = "no pseudo-labels:\nthis run was trained on\nBEV ground truth\n(pass --labels to show some)"


def sample_title(s: SampleRecord) -> str:
    return f"{s.scene_name}:{s.index_in_scene}  (sample {s.token[:8]})"


@torch.no_grad()
def visualize(
    checkpoint: str | Path,
    sample: str,
    out: str | Path,
    dataroot: str | None = None,
    version: str | None = None,
    labels: str | None = None,
    gt: str | None = None,
    device: str = "auto",
) -> list[Path]:
    """Write the PNGs of ``sample`` (a token or ``SCENE:INDEX``) into ``out``; data paths
    default to the ones the run trained on."""
    dev = resolve_device(device)
    (m,) = load_models([str(checkpoint)], dev)
    dataroot, version, labels, gt = data_paths(m, dataroot, version, labels, gt)
    index = load_index(dataroot, version)
    target = index.find_sample(sample)
    scene = index.scene_samples(target.scene_name)
    samples = scene[: target.index_in_scene + 1] if m.temporal else [target]
    for item, pred in predict_items(m, drawing_dataset(m, index, samples, labels, gt), dev):
        pass  # the last one is the target (the ones before only build its history)
    out = Path(out)
    names = m.class_set.names_with_background
    gt_ids = item["bev_gt"].numpy()
    title = f"{sample_title(target)} — {m.name}"
    written = [render.save_png(render.bev_figure(
        [render.BevMap(f"prediction ({m.name})", pred, gt_ids), render.BevMap("ground truth", gt_ids)],
        m.grid, names, title), out / "bev.png")]
    images = camera_images(item)
    reproj = reprojection(pred, item, m.grid, m.class_set.num_classes)
    overlays = [render.overlay(images[n], reproj[n]) for n in range(len(CAMERAS))]
    pseudo = pseudo_label_images(item)
    columns = [render.CameraColumn("camera image", list(images)),
               render.CameraColumn("BEV prediction on the ground", overlays),
               render.CameraColumn("pseudo-labels", pseudo, NO_PSEUDO_LABELS)]
    for n, cam in enumerate(CAMERAS):
        one = [render.CameraColumn(c.title, None if c.images is None else [c.images[n]], c.message) for c in columns]
        written.append(render.save_png(render.cameras_figure(one, [cam], names, title), out / f"cam_{cam}.png"))
    written.append(render.save_png(render.cameras_figure(columns, CAMERAS, names, title), out / "cameras.png"))
    (out / "legend.json").write_text(json.dumps({
        "sample": target.token, "scene": target.scene_name, "index_in_scene": target.index_in_scene,
        "checkpoint": str(checkpoint), "history": m.temporal and target.index_in_scene > 0,
        "classes": {n: [int(x) for x in c] for n, c in zip(names, render.class_rgb(len(names)))},
        "bev.png": "prediction | ground truth (x forward up, y left to the left, metres); under the prediction "
                   "its error view",
        "cameras.png": "per camera: image | BEV prediction reprojected onto the ground | pseudo-labels",
        "pseudo_labels": pseudo is not None}, indent=2) + "\n")
    return written


@torch.no_grad()
def compare_samples(
    checkpoints: dict[str, str],
    samples: Sequence[str],
    out: str | Path,
    dataroot: str | None = None,
    version: str | None = None,
    gt: str | None = None,
    device: str = "auto",
) -> list[Path]:
    """One PNG per sample (token or ``SCENE:INDEX``): the ground truth, then each model's
    prediction (``checkpoints``: title -> checkpoint) with its error view, side by side.
    Written as ``out/<scene>_<index>.png``."""
    dev = resolve_device(device)
    models = load_models(list(checkpoints.values()), dev)
    for m, title in zip(models, checkpoints):
        m.name = title
    dataroot, version, _, gt = data_paths(models[0], dataroot, version, None, gt)
    index = load_index(dataroot, version)
    names = models[0].class_set.names_with_background
    written = []
    for ref in samples:
        target = index.find_sample(ref)
        scene = index.scene_samples(target.scene_name)
        maps: list[render.BevMap] = []
        for m in models:
            todo = scene[: target.index_in_scene + 1] if m.temporal else [target]
            for item, pred in predict_items(m, drawing_dataset(m, index, todo, None, gt), dev):
                pass  # the last one is the target
            if not maps:
                maps.append(render.BevMap("ground truth", item["bev_gt"].numpy()))
            maps.append(render.BevMap(m.name, pred, maps[0].ids))
        path = Path(out) / f"{target.scene_name}_{target.index_in_scene}.png"
        written.append(render.save_png(render.bev_figure(maps, models[0].grid, names, sample_title(target)), path))
    return written

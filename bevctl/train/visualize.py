"""PNGs of one sample: BEV prediction vs GT, and the prediction reprojected onto the six
camera images next to their pseudo-labels.

``bev.png``: prediction | ground truth, x (forward) up, y (left) to the left, ego at the centre.
``cam_<CAMERA>.png``: image | image with the reprojected BEV prediction | pseudo-label (BEV
ids after the label map; black = ignore / ray misses the ground or the grid).
``cameras.png``: the six camera rows stacked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bevctl.data.nuscenes import load_index
from bevctl.data.records import CAMERAS
from bevctl.errors import BevctlError
from bevctl.pseudolabel.label_maps import resolve_label_map
from bevctl.storage import location
from bevctl.storage.labels import LabelStore
from bevctl.train.build import load_trained_model
from bevctl.train.dataset import TrainDataset, collate
from bevctl.train.distributed import resolve_device
from bevctl.train.losses import RayGrid, compute_ray_grid, reproject_logits
from bevctl.train.tasks import to_device

PALETTE = np.array([
    [40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
], dtype=np.uint8)


def colorize(ids: np.ndarray) -> np.ndarray:
    """BEV ids ``(...)`` -> RGB ``(..., 3)``; 255 (ignore) is black."""
    out = PALETTE[np.minimum(ids, len(PALETTE) - 1) % len(PALETTE)].copy()
    out[ids == 255] = 0
    return out


def bev_to_image(ids: np.ndarray, scale: int = 3) -> np.ndarray:
    """(X, Y) ids -> RGB image with x forward up and y left on the left."""
    rgb = colorize(ids[::-1, ::-1])
    return np.repeat(np.repeat(rgb, scale, 0), scale, 1)


def _save(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path)


def _legend(names: tuple[str, ...]) -> str:
    return ", ".join(f"{n}=rgb{tuple(int(x) for x in PALETTE[i % len(PALETTE)])}" for i, n in enumerate(names))


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
    """Write the PNGs for ``sample``; data paths default to the ones the run trained on."""
    dev = resolve_device(device)
    trained = load_trained_model(checkpoint, dev)
    model, cfg, run = trained.model, trained.cfg, trained.run
    if not dataroot and run.get("dataroot") and not Path(run["dataroot"]).is_dir():
        raise BevctlError(f"dataset {run['dataroot']} (recorded in {checkpoint}) not found: if it moved, "
                          "pass its new location as --dataroot")
    dataroot = dataroot or run.get("dataroot")
    version = version or run.get("version")
    labels = labels or run.get("labels")
    gt = gt or run.get("gt")
    if not dataroot or not version:
        raise BevctlError("visualize: the checkpoint names no dataset; pass --dataroot and --version")
    grid, class_set = trained.setup.grid, trained.setup.class_set
    index = load_index(dataroot, version)
    if sample not in index.samples:
        raise BevctlError(f"--sample: no sample '{sample}' in {dataroot}/{version}")
    kwargs: dict[str, Any] = {}
    if labels and location.exists(labels):
        store = LabelStore.open(labels)
        if sample in store and store.status(sample) == "done":
            kwargs.update(labels_path=str(labels), lut=resolve_label_map(store.id2label, class_set, cfg.label_map),
                          label_hw=cfg.label_hw)
    if gt and location.exists(gt):
        kwargs["gt_path"] = str(gt)
    else:
        kwargs["rasterize"] = (str(dataroot), grid, class_set)
    image_hw = trained.setup.image_hw
    ds = TrainDataset([index.samples[sample]], index.samples, image_hw, **kwargs)
    item = ds[0]
    batch = to_device(collate([item]), dev)
    logits = model(batch["images"], batch["pix_T_cam"], batch["ego_T_cam"]).logits.float()
    pred = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)  # (X, Y)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    gt_ids = item["bev_gt"].numpy()
    sep = np.full((grid.nx * 3, 6, 3), 255, np.uint8)
    _save(np.concatenate([bev_to_image(pred), sep, bev_to_image(gt_ids)], axis=1), out / "bev.png")
    written.append(out / "bev.png")

    # reprojection of the prediction into every camera, at image resolution
    rays = compute_ray_grid(batch["pix_T_cam"][0].cpu(), batch["ego_T_cam"][0].cpu(), image_hw, image_hw, grid)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(pred).long(), class_set.num_classes)
    onehot = onehot.permute(2, 0, 1)[None].float()

    sampled = reproject_logits(onehot, grid, RayGrid(rays.xy[None], rays.valid[None]))[0].argmax(0)  # (N, P)
    reproj = torch.where(rays.valid, sampled, torch.full_like(sampled, 255)).reshape(-1, *image_hw).numpy()
    images = item["images"].numpy().transpose(0, 2, 3, 1)  # (N, H, W, 3)
    labels_ids = item.get("labels")
    rows = []

    for n, cam in enumerate(CAMERAS):
        img = images[n]
        over = img.copy()
        hit = reproj[n] != 255
        over[hit] = (0.45 * img[hit] + 0.55 * colorize(reproj[n])[hit]).astype(np.uint8)
        if labels_ids is not None:
            lab = np.asarray(Image.fromarray(labels_ids[n].numpy()).resize(image_hw[::-1], Image.NEAREST))
            lab_rgb = colorize(lab)
        else:
            lab_rgb = np.zeros_like(img)
        vsep = np.full((image_hw[0], 4, 3), 255, np.uint8)
        row = np.concatenate([img, vsep, over, vsep, lab_rgb], axis=1)
        _save(row, out / f"cam_{cam}.png")
        written.append(out / f"cam_{cam}.png")
        rows.append(row)
    _save(np.concatenate(rows, axis=0), out / "cameras.png")
    written.append(out / "cameras.png")
    (out / "legend.json").write_text(json.dumps({
        "sample": sample, "checkpoint": str(checkpoint), "classes": _legend(class_set.names_with_background),
        "bev.png": "prediction | ground truth (x forward up, y left to the left)",
        "cam_*.png": "image | BEV prediction reprojected onto the ground | pseudo-label (black: ignore)",
        "pseudo_labels": bool(labels_ids is not None)}, indent=2) + "\n")
    return written

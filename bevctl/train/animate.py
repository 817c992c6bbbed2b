"""``bevctl visualize --scene NAME --out drive.gif``: an animation over a whole scene.

One frame per keyframe, in time order: the six cameras with the first model's BEV prediction
reprojected onto the ground (or the pseudo-labels, ``overlay="pseudo-labels"``), and the BEV
maps side by side (every model's prediction with its per-frame mIoU, then the ground truth),
with the class legend, the ego and metric axes (:func:`bevctl.render.scene_frame`). Temporal
models see each frame with its history, as in evaluation. ``.gif`` is written with Pillow,
``.mp4`` with OpenCV's ``VideoWriter`` (mp4v); both atomically (temp file + rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bevctl import render
from bevctl.data.nuscenes import load_index
from bevctl.data.records import CAMERAS
from bevctl.errors import BevctlError
from bevctl.io import disk_full_error, is_disk_full
from bevctl.train.distributed import resolve_device
from bevctl.train.visualize import (camera_images, data_paths, drawing_dataset, load_models, predict_items,
                                    pseudo_label_ids, reprojection)

FORMATS = (".gif", ".mp4")
OVERLAYS = ("prediction", "pseudo-labels")


def check_output(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise BevctlError(f"--out {out}: an animation is written as {' or '.join(FORMATS)}")
    return out


def write_animation(frames: Sequence[np.ndarray], out: Path, fps: float) -> Path:
    """Write RGB frames ``(H, W, 3)`` (all one size) as ``out`` (.gif or .mp4), atomically."""
    out = check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=f"{out.suffix}.tmp{out.suffix}")
    os.close(fd)
    try:
        if out.suffix.lower() == ".gif":
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps),
                           loop=0, optimize=False)
        else:
            import cv2  # noqa: PLC0415 - OpenCV: only for .mp4, and slow to import

            h, w = frames[0].shape[:2]
            writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w - w % 2, h - h % 2))
            if not writer.isOpened():
                raise BevctlError(f"--out {out}: OpenCV has no mp4 writer here; write a .gif instead")
            for f in frames:
                writer.write(np.ascontiguousarray(f[: h - h % 2, : w - w % 2, ::-1]))
            writer.release()
        os.replace(tmp, out)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(out) from None
        raise
    return out


@torch.no_grad()
def animate_scene(
    checkpoints: Sequence[str],
    scene: str,
    out: str | Path,
    dataroot: str | None = None,
    version: str | None = None,
    labels: str | None = None,
    gt: str | None = None,
    device: str = "auto",
    fps: float = 2.0,
    overlay: str = "prediction",
) -> tuple[Path, int]:
    """Render ``scene`` with every checkpoint side by side into ``out``; returns (path, frames).
    Data paths default to the ones the first checkpoint's run trained on."""
    out = check_output(out)
    if overlay not in OVERLAYS:
        raise BevctlError(f"--overlay must be one of {', '.join(OVERLAYS)}, got '{overlay}'")
    if not fps > 0:
        raise BevctlError(f"--fps must be > 0, got {fps}")
    dev = resolve_device(device)
    models = load_models(checkpoints, dev)
    first = models[0]
    dataroot, version, labels, gt = data_paths(first, dataroot, version, labels, gt)
    index = load_index(dataroot, version)
    samples = index.scene_samples(scene)
    if overlay == "pseudo-labels" and not labels:
        raise BevctlError("--overlay pseudo-labels: no pseudo-label store (pass --labels)")
    streams = [predict_items(m, drawing_dataset(m, index, samples, labels if k == 0 else None, gt), dev)
               for k, m in enumerate(models)]
    names = first.class_set.names_with_background
    frames = []
    for s, results in zip(samples, zip(*streams)):
        item, _ = results[0]
        gt_ids = item["bev_gt"].numpy()
        images = camera_images(item)
        if overlay == "prediction":
            reproj = reprojection(results[0][1], item, first.grid, first.class_set.num_classes)
            shown = [render.overlay(images[n], reproj[n]) for n in range(len(CAMERAS))]
        else:
            pseudo = pseudo_label_ids(item)
            if pseudo is None:
                raise BevctlError(f"--overlay pseudo-labels: {labels} has no finished pseudo-labels for scene '{scene}'")
            shown = [render.overlay(images[n], pseudo[n]) for n in range(len(CAMERAS))]
        maps = [render.BevMap(f"{m.name}", pred, gt_ids) for m, (_, pred) in zip(models, results)]
        maps.append(render.BevMap("ground truth", gt_ids))
        title = (f"{scene}  frame {s.index_in_scene + 1}/{len(samples)}  (sample {s.token[:8]});  cameras: "
                 f"{'prediction of ' + first.name if overlay == 'prediction' else 'pseudo-labels'}")
        frames.append(render.figure_rgb(render.scene_frame(list(zip(CAMERAS, shown)), maps, first.grid, names, title)))
    return write_animation(frames, out, fps), len(frames)

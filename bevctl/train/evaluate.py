"""BEV segmentation metrics: per-class IoU and mIoU on a split.

Rules (also written into every result):

- prediction = argmax over all output channels (background included), per BEV cell;
- every cell of the grid counts, for every sample of the split that has ground truth; cells
  whose GT is 255 (ignore) would be skipped (the GT rasteriser writes none);
- IoU_k = TP_k / (TP_k + FP_k + FN_k), with the counts summed over all cells of all samples
  (dataset-level, not a mean of per-sample IoUs);
- mIoU = mean of IoU over the BEV classes, background excluded (its IoU is reported apart);
  a class absent from both GT and prediction has IoU null and is left out of the mean.

The same metrics are also reported per distance band (``by_range``): a cell belongs to the band
that holds the distance of its centre from the ego origin; default band edges are 1/4, 1/2 and
3/4 of the grid's forward half-length (4, 8, 12 m on the ``demo`` grid). Cameras do not see
the ground right around the car, so pretraining on image pseudo-labels is weakest in the first
band (docs/demo_tuning.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from bevctl.config import BEVGrid
from bevctl.data.nuscenes import load_index
from bevctl.errors import BevctlError
from bevctl.geometry import bev_cell_centers
from bevctl.storage import location
from bevctl.train.build import load_trained_model
from bevctl.train.dataset import eval_dataset, gt_store_remedy
from bevctl.train.distributed import resolve_device
from bevctl.train.inference import forward_in_order, make_loader, uses_history

RULES = ("argmax over all channels incl. background; every grid cell of every sample with GT counts "
         "(GT 255 = ignore); IoU = TP/(TP+FP+FN) summed over the split; mIoU = mean over BEV classes "
         "without background; classes absent from GT and prediction are null and excluded")


def default_range_edges(grid: BEVGrid) -> tuple[float, ...]:
    """Band edges (m): 1/4, 1/2, 3/4 of the grid's forward half-length."""
    half = max(abs(grid.x_min), abs(grid.x_max))
    return (half / 4, half / 2, 3 * half / 4)


def check_range_edges(edges: tuple[float, ...]) -> None:
    if list(edges) != sorted(edges) or any(e <= 0 for e in edges) or len(set(edges)) != len(edges):
        raise BevctlError(f"range band edges must be positive and increasing, got {list(edges)}")


def range_bands(grid: BEVGrid, edges: tuple[float, ...]) -> torch.Tensor:
    """``(X, Y)`` int64: the band of each cell (0 = closer than ``edges[0]``, ...,
    ``len(edges)`` = at or beyond the last edge), by the distance of the cell centre from the
    ego origin."""
    check_range_edges(edges)
    dist = torch.linalg.norm(bev_cell_centers(grid, dtype=torch.float64), dim=-1)  # (X, Y)
    return torch.bucketize(dist, torch.tensor(edges, dtype=torch.float64), right=True)


def update_confusion_by_band(conf: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor, bands: torch.Tensor) -> None:
    """Accumulate ``conf[band, gt, pred]`` (K, C, C) int64. pred, gt ``(B, X, Y)``; bands ``(X, Y)``."""
    k, c = conf.shape[:2]
    gt = gt.long()
    valid = gt < c  # 255 = ignore
    band = bands.expand_as(gt)
    idx = (band[valid] * c + gt[valid]) * c + pred.long()[valid]
    conf += torch.bincount(idx, minlength=k * c * c).reshape(k, c, c).to(conf)


def by_range_results(conf_bands: np.ndarray, edges: tuple[float, ...], names: tuple[str, ...]) -> list[dict[str, Any]]:
    """One entry per band: ``min_m``, ``max_m`` (None = open), ``cells``, ``miou``, ``iou`` per class."""
    bounds = [0.0, *edges, None]
    out = []
    for k in range(conf_bands.shape[0]):
        r = iou_from_confusion(conf_bands[k], names)
        out.append({"min_m": bounds[k], "max_m": bounds[k + 1], "cells": int(conf_bands[k].sum()), "miou": r["miou"],
                    "iou": {n: c["iou"] for n, c in r["classes"].items()}})
    return out


def iou_from_confusion(conf: np.ndarray, names: tuple[str, ...]) -> dict[str, Any]:
    """names: with background first. -> {"classes": {name: {...}}, "miou", "background_iou"}."""
    conf = np.asarray(conf, dtype=np.int64)
    tp = np.diag(conf)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    out: dict[str, Any] = {"classes": {}}
    ious = []
    for k, name in enumerate(names):
        union = int(tp[k] + fp[k] + fn[k])
        iou = float(tp[k] / union) if union > 0 else None
        out["classes"][name] = {"iou": iou, "tp": int(tp[k]), "fp": int(fp[k]), "fn": int(fn[k]),
                                "gt_cells": int(tp[k] + fn[k])}
        if k > 0 and iou is not None:
            ious.append(iou)
    out["background_iou"] = out["classes"][names[0]]["iou"]
    out["miou"] = float(np.mean(ious)) if ious else None
    return out


def format_markdown(result: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = [f"**{result['split']}** ({result['num_samples']} samples) — checkpoint `{result['checkpoint']}`", "",
             "| class | IoU % | GT cells |", "|---|---:|---:|"]
    for name, c in result["classes"].items():
        lines.append(f"| {name} | {pct(c['iou'])} | {c['gt_cells']} |")
    lines.append(f"| **mIoU** (without background) | **{pct(result['miou'])}** | |")
    if result.get("by_range"):
        names = [n for n in result["classes"] if n != "background"]
        lines += ["", "By distance from the ego (IoU %):", "",
                  "| range | " + " | ".join(names) + " | mIoU | cells |", "|---|" + "---:|" * (len(names) + 2)]
        for band in result["by_range"]:
            hi = "" if band["max_m"] is None else f"{band['max_m']:g}"
            lines.append(f"| {band['min_m']:g}-{hi} m | " + " | ".join(pct(band["iou"][n]) for n in names)
                         + f" | {pct(band['miou'])} | {band['cells']} |")
    lines += ["", f"Rules: {result['rules']}."]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def evaluate(
    checkpoint: str | Path,
    dataroot: str,
    version: str,
    split: str = "val",
    gt: str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 2,
    num_workers: int = 2,
    progress: bool = True,
    temporal: bool | None = None,
    range_edges: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Per-class IoU + mIoU of ``checkpoint`` on ``split``; writes ``out`` (JSON) and ``.md``.

    ``temporal``: feed each frame the previous frame's BEV features (``prev_bev``), as the
    model saw in training. Default: on for pretraining runs with a temporal loss (they train
    with ``prev_bev``), off for fine-tuned ones (trained frame by frame). ``range_edges``: the
    distance bands of ``by_range`` in metres (default :func:`default_range_edges`)."""
    dev = resolve_device(device)
    if out is not None:  # a bad --out URL fails before the evaluation, not after it
        location.check(out)
    if range_edges:  # bad edges fail before the model and the index are loaded
        check_range_edges(tuple(float(e) for e in range_edges))
    trained = load_trained_model(checkpoint, dev)
    model, cfg = trained.model, trained.cfg
    if temporal is None:
        temporal = uses_history(cfg, trained.run)
    grid, class_set = trained.setup.grid, trained.setup.class_set
    index = load_index(dataroot, version)
    ds = eval_dataset(index, split, trained.setup.image_hw, grid, class_set, gt,
                      remedy=gt_store_remedy(index.dataroot, version, cfg.grid, cfg.class_set))
    loader = make_loader(ds, batch_size, num_workers, temporal)
    c = class_set.num_classes
    edges = tuple(float(e) for e in range_edges) if range_edges else default_range_edges(grid)
    bands = range_bands(grid, edges)
    conf_bands = torch.zeros(len(edges) + 1, c, c, dtype=torch.int64)

    with Progress(TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress) as bar:
        task = bar.add_task("eval", total=len(ds))
        for fwd in forward_in_order(model, loader, ds.samples, dev, temporal):
            update_confusion_by_band(conf_bands, fwd.logits.argmax(1).cpu(), fwd.batch["bev_gt"], bands)
            bar.advance(task, len(fwd.batch["token"]))
    conf = conf_bands.sum(0)
    names = class_set.names_with_background
    result = {"checkpoint": str(checkpoint), "dataroot": str(dataroot), "version": version, "split": split,
              "num_samples": len(ds), "temporal": bool(temporal), "grid": cfg.grid, "class_set": cfg.class_set, "rules": RULES,
              **iou_from_confusion(conf.numpy(), names),
              "confusion": conf.tolist(),
              "by_range": by_range_results(conf_bands.numpy(), edges, names)}
    if out is not None:  # a local path or a URL; each file written whole
        location.write_text_atomic(out, json.dumps(result, indent=2) + "\n")
        location.write_text_atomic(location.with_suffix(out, ".md"), format_markdown(result))
    return result
